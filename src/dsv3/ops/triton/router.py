"""DeepSeek-V3's router (`noaux_tc`) in Triton: sigmoid scores, bias-corrected group-limited top-k.

Per token: scores = sigmoid(logits); the choice adds `e_score_correction_bias`; groups are ranked by the
sum of their two best biased scores and the best `topk_group` kept; the top-k experts among them are
picked (ties to the lower expert id) and weighted by their *unbiased* scores, normalised when `norm`,
times `scale`. One program per token keeps all E scores in registers (E = 256 for V3): what
sgl-kernel's `moe_fused_gate` does in CUDA. The gate's matmul (x · Wᵀ, fp32) runs before it.
"""

from __future__ import annotations

import torch
import triton.language as tl

from dsv3.ops.triton._launch import check_device, fix_interpreter, jit, next_pow2


@jit
def _route_kernel(Logits, Bias, Weights, Ids, Scores, E, scale, stride_l, HAS_BIAS: tl.constexpr,
                  NORM: tl.constexpr, G: tl.constexpr, EG: tl.constexpr, TOPK_GROUP: tl.constexpr,
                  TOP_K: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.arange(0, G * EG)
    emask = offs < E
    logit = tl.load(Logits + t.to(tl.int64) * stride_l + offs, mask=emask, other=0.0).to(tl.float32)
    scores = 1.0 / (1.0 + tl.exp(-logit))
    tl.store(Scores + t.to(tl.int64) * E + offs, scores, mask=emask)
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(Bias + offs, mask=emask, other=0.0).to(tl.float32)
    choice = tl.where(emask, choice, float("-inf"))
    if G > 1:
        grouped = tl.reshape(choice, (G, EG))
        inner = tl.arange(0, EG)
        first = tl.max(grouped, 1)
        at = tl.argmax(grouped, 1)
        second = tl.max(tl.where(inner[None, :] == at[:, None], float("-inf"), grouped), 1)
        gscore = first + second if EG > 1 else first
        gids = tl.arange(0, G)
        keep = gids < 0
        for _ in tl.static_range(TOPK_GROUP):
            g = tl.argmax(tl.where(keep, float("-inf"), gscore), 0)
            keep = keep | (gids == g)
        choice = tl.reshape(tl.where(keep[:, None], grouped, float("-inf")), (G * EG,))
    ks = tl.arange(0, BLOCK_K)
    ids = tl.zeros([BLOCK_K], tl.int32)
    wts = tl.zeros([BLOCK_K], tl.float32)
    for k in tl.static_range(TOP_K):
        e = tl.argmax(choice, 0)
        w = tl.sum(tl.where(offs == e, scores, 0.0), 0)
        ids = tl.where(ks == k, e, ids)
        wts = tl.where(ks == k, w, wts)
        choice = tl.where(offs == e, float("-inf"), choice)
    if NORM:
        wts = wts / (tl.sum(wts, 0) + 1e-20)
    kmask = ks < TOP_K
    tl.store(Weights + t.to(tl.int64) * TOP_K + ks, wts * scale, mask=kmask)
    tl.store(Ids + t.to(tl.int64) * TOP_K + ks, ids.to(tl.int64), mask=kmask)


def supported(n_experts: int, n_group: int) -> bool:
    """Shapes the kernel takes: groups and experts per group powers of two (V3: 8 × 32)."""
    g = max(1, n_group)
    return n_experts % g == 0 and next_pow2(g) == g and next_pow2(n_experts // g) == n_experts // g


def select(logits: torch.Tensor, bias: torch.Tensor | None, n_group: int, topk_group: int, top_k: int, norm: bool,
           scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gate logits [N, E] -> (weights [N, K] fp32, expert ids [N, K] int64, scores [N, E] fp32)."""
    check_device(logits, "route_noaux")
    fix_interpreter()
    N, E = logits.shape
    G = max(1, n_group)
    if not supported(E, G):
        raise ValueError(f"route_noaux: {E} experts in {G} groups is not a power-of-two layout")
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    weights = torch.empty(N, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(N, top_k, dtype=torch.int64, device=logits.device)
    scores = torch.empty(N, E, dtype=torch.float32, device=logits.device)
    if N:
        _route_kernel[(N,)](logits, bias if bias is not None else logits, weights, ids, scores, E, float(scale),
                            logits.stride(0), HAS_BIAS=bias is not None, NORM=bool(norm and top_k > 1), G=G,
                            EG=E // G, TOPK_GROUP=min(topk_group, G) if G > 1 else 1, TOP_K=top_k,
                            BLOCK_K=max(2, next_pow2(top_k)))
    return weights, ids, scores


def route_noaux(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n_group: int, topk_group: int,
                top_k: int, norm: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `dsv3::route_noaux` op: fp32 gate logits x · Wᵀ, then `select`."""
    logits = x.reshape(-1, x.shape[-1]).float() @ weight.float().T
    return select(logits, None if bias is None else bias.float().contiguous(), n_group, topk_group, top_k, norm, scale)
