"""AWQ (arXiv 2306.00978) for DeepSeek-V3 blocks: activation-aware scales, then clipping, before int4.

For each group of linears sharing one input, search s = x̄^α / w̄^(1−α) (α on a 20-point grid,
AutoAWQ's `duo_scaling`, normalised by √(max·min)), and s = 1 — that grid lacks the identity, so
without it AWQ can score worse than plain rounding on a group with no salient channels — minimising the mean squared error of the output
of the whole module those linears feed — the attention block for every MLA projection, the MLP or
the MoE (routing fixed) for gate/up, the expert for its down projection — with each candidate's
weights replaced by Q(W·diag(s))·diag(s)⁻¹. Then fold: the producer of the input (an RMSNorm, or
the rows of the previous linear) is divided by s and the consumers' input columns multiplied by s,
so the float model computes the same function.

Groups in a V3 block: input_layernorm → [q_a_proj | q_proj, kv_a_proj_with_mqa (+ a V3.2 indexer's wk and
weights_proj)]; q_a_layernorm → q_b_proj (+ the indexer's wq_b); kv_a_layernorm → kv_b_proj; value rows of kv_b_proj → o_proj (per head); post_attention_
layernorm → dense gate/up, or → shared + all routed gate/up with the router's columns multiplied
by s (it reads the same normed input, so its logits — hence routing — are unchanged); up rows →
down per expert. A routed expert that no calibration token reaches is calibrated on *all* tokens
(forced routing) and reported, so it is neither a crash nor silently unscaled. Then per-group
clipping of |W| (AutoAWQ's grid, q/k-producing projections skipped). Layers are processed in
order, each on the float outputs of the previous one. MTP modules are quantized round-to-nearest.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dsv3.attention.context import AttentionContext
from dsv3.layers.mlp import MLP
from dsv3.layers.moe import MoE
from dsv3.quant.schemes import ceil_to, effective_group, pseudo_quantize_int4


@dataclass
class AWQResult:
    clips: dict[str, object] = field(default_factory=dict)  # module name -> clip [N, G] (experts: per projection)
    forced_experts: dict[str, list[int]] = field(default_factory=dict)  # MoE name -> experts with no calib tokens

    def get(self, name: str, default=None):
        return self.clips.get(name, default)


@contextmanager
def _swapped(params: Sequence[torch.Tensor], values: Sequence[torch.Tensor]):
    """Temporarily give `params` other data (a candidate's fake-quantized weights)."""
    saved = [p.data for p in params]
    for p, v in zip(params, values):
        p.data = v
    try:
        yield
    finally:
        for p, d in zip(params, saved):
            p.data = d


class _Search:
    """The scale and clip searches, sharing the quantizer settings."""

    def __init__(self, group_size: int, zero_point: bool, n_grid: int = 20, max_shrink: float = 0.5, clip_tokens: int = 512):
        self.g, self.zp, self.n_grid, self.max_shrink, self.clip_tokens = group_size, zero_point, n_grid, max_shrink, clip_tokens

    def group(self, K: int) -> int:
        return effective_group(K, self.g)

    def q(self, w: torch.Tensor) -> torch.Tensor:
        return pseudo_quantize_int4(w, self.group(w.shape[-1]), self.zp)

    def scale(self, x: torch.Tensor, params: Sequence[torch.Tensor], run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Best per-input-channel s [K] for `params` (input dim last); `run()` computes the inspected output."""
        K, g = x.shape[-1], self.group(x.shape[-1])
        x_mean = x.abs().float().reshape(-1, K).mean(0)
        rows = torch.cat([w.detach().reshape(-1, K).float() for w in params])
        Kp = ceil_to(K, g)
        grp = F.pad(rows.abs(), (0, Kp - K)).view(rows.shape[0], -1, g)
        w_mean = (grp / (grp.amax(-1, keepdim=True) + 1e-6)).view(rows.shape[0], Kp)[:, :K].mean(0)
        ref = run().float()
        best, best_s = float("inf"), torch.ones(K, device=x.device)
        for i in range(-1, self.n_grid):  # -1: s = 1, plain round-to-nearest, so AWQ never scores worse than it
            a = i / self.n_grid
            s = torch.ones(K, device=x.device) if i < 0 else (x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            cand = [(self.q(w.detach().float() * s) / s).to(w.dtype) for w in params]
            with _swapped(params, cand):
                err = (run().float() - ref).pow(2).mean().item()
            if err < best:
                best, best_s = err, s
        return best_s

    def clip(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per (row, group) cap on |w| minimising the group-wise output error on sampled inputs."""
        N, K = w.shape
        g = self.group(K)
        Kp = ceil_to(K, g)
        x = x.reshape(-1, K).float()
        x = x[:: max(1, x.shape[0] // self.clip_tokens)][: self.clip_tokens]
        xg = F.pad(x, (0, Kp - K)).view(x.shape[0], -1, g)  # [n, G, g]
        wg = F.pad(w.float(), (0, Kp - K)).view(N, -1, g)  # [N, G, g]
        ref = torch.einsum("ngk,ogk->ogn", xg, wg)
        org_max = wg.abs().amax(-1)
        best_err, best = torch.full_like(org_max, float("inf")), org_max.clone()
        for i in range(int(self.max_shrink * self.n_grid)):
            cap = org_max * (1 - i / self.n_grid)
            q = pseudo_quantize_int4(w.float(), g, self.zp, clip=cap)
            qg = F.pad(q, (0, Kp - K)).view(N, -1, g)
            err = (torch.einsum("ngk,ogk->ogn", xg, qg) - ref).pow(2).mean(-1)
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, cap, best)
        return best


@torch.no_grad()
def _fold(producer: torch.Tensor, s: torch.Tensor, consumers: Sequence[torch.Tensor]) -> None:
    """producer (a norm weight [K], or the rows [K, ...] of a linear) ÷ s; consumers' input columns × s."""
    producer.div_(s.to(producer.dtype).view(-1, *([1] * (producer.dim() - 1))))
    for w in consumers:
        w.mul_(s.to(w.dtype))


@torch.no_grad()
def _scale_attention(attn: nn.Module, norm: nn.Module, x: torch.Tensor, cos, sin, S: _Search) -> None:
    """The four MLA groups, each scored on the attention block's output."""
    h = norm(x)

    def run() -> torch.Tensor:
        return attn(h, cos, sin, AttentionContext())

    ix = getattr(attn, "indexer", None)  # DSA: the indexer reads the same normed input and compressed query
    first = [attn.q_proj if attn.q_lora_rank is None else attn.q_a_proj, attn.kv_a_proj_with_mqa]
    params = [m.weight for m in first] + ([ix.wk.weight] if ix is not None else [])
    s = S.scale(h, params, run)
    _fold(norm.weight, s, params + ([ix.weights_proj.weight] if ix is not None else []))  # (never quantized, still rescaled)
    h = norm(x)
    if attn.q_lora_rank is not None:
        qa = attn.q_a_layernorm(attn.q_a_proj(h))
        q_b = [attn.q_b_proj.weight] + ([ix.wq_b.weight] if ix is not None else [])
        s = S.scale(qa, q_b, run)
        _fold(attn.q_a_layernorm.weight, s, q_b)
    lat = attn.kv_a_layernorm(attn.kv_a_proj_with_mqa(h)[..., : attn.kv_lora_rank])
    s = S.scale(lat, [attn.kv_b_proj.weight], run)
    _fold(attn.kv_a_layernorm.weight, s, [attn.kv_b_proj.weight])
    o_in = _capture_input(attn.o_proj, run)
    s = S.scale(o_in, [attn.o_proj.weight], lambda: attn.o_proj(o_in))  # = the attention output, heads fixed
    H, dn, dv = attn.n_heads, attn.nope_dim, attn.v_dim
    v_rows = (torch.arange(H)[:, None] * (dn + dv) + dn + torch.arange(dv)[None]).flatten()
    w = attn.kv_b_proj.weight
    w[v_rows] = w[v_rows] / s[:, None].to(w.dtype)
    attn.o_proj.weight.mul_(s.to(attn.o_proj.weight.dtype))


@torch.no_grad()
def _scale_mlp(block: nn.Module, x2: torch.Tensor, S: _Search, result: AWQResult, prefix: str) -> None:
    """post_attention_layernorm → gate/up (dense, or shared + routed with the router), then up → down."""
    norm, mlp = block.post_attention_layernorm, block.mlp
    h = norm(x2).reshape(-1, x2.shape[-1])
    if isinstance(mlp, MLP):
        params = [mlp.gate_proj.weight, mlp.up_proj.weight]
        s = S.scale(h, params, lambda: mlp(h))
        _fold(norm.weight, s, params)
        _scale_down(S, norm(x2).reshape(-1, x2.shape[-1]), mlp)
        return
    sh, ex = mlp.shared_experts, mlp.experts
    weights, idx, _ = mlp.gate(h)

    def run() -> torch.Tensor:  # the MoE output with routing fixed to the float router's choice
        y = ex(h, idx, weights.float())
        return y if sh is None else y + sh(h)

    params = [ex.gate_up_proj] + ([sh.gate_proj.weight, sh.up_proj.weight] if sh is not None else [])
    s = S.scale(h, params, run)
    _fold(norm.weight, s, params + [mlp.gate.weight])  # the router reads the same normed input
    h = norm(x2).reshape(-1, x2.shape[-1])
    if sh is not None:
        _scale_down(S, h, sh)
    Im = ex.down_proj.shape[-1]
    for e, xe in _expert_inputs(mlp, h, result, f"{prefix}.mlp"):
        gate, up, down = ex.gate_up_proj[e, :Im], ex.gate_up_proj[e, Im:], ex.down_proj[e]
        mid = F.silu(F.linear(xe, gate)) * F.linear(xe, up)
        s = S.scale(mid, [down], lambda: F.linear(mid, down))
        _fold(up, s, [down])


def _scale_down(S: _Search, h: torch.Tensor, mlp: MLP) -> None:
    mid = F.silu(mlp.gate_proj(h)) * mlp.up_proj(h)
    s = S.scale(mid, [mlp.down_proj.weight], lambda: mlp.down_proj(mid))
    _fold(mlp.up_proj.weight, s, [mlp.down_proj.weight])


def _expert_inputs(moe: MoE, h: torch.Tensor, result: AWQResult, name: str):
    """(expert, its calibration inputs); experts no token reaches get every token (and are recorded)."""
    _, idx, _ = moe.gate(h)
    for e in range(moe.experts.gate_up_proj.shape[0]):
        rows = (idx == e).any(-1)
        if not rows.any():
            result.forced_experts.setdefault(name, []).append(e)
            yield e, h
        else:
            yield e, h[rows]


def _capture_input(module: nn.Module, fn: Callable[[], object]) -> torch.Tensor:
    box = []
    handle = module.register_forward_pre_hook(lambda m, args: box.append(args[0].detach()))
    try:
        fn()
    finally:
        handle.remove()
    return box[0]


@torch.no_grad()
def _clip_block(block: nn.Module, x: torch.Tensor, cos, sin, S: _Search, result: AWQResult, prefix: str) -> None:
    """Clip search on the scaled block: o_proj and every MLP / expert projection."""
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) and (n == "self_attn.o_proj" or n.startswith("mlp."))}
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0].detach())) for n, m in linears.items()]
    try:
        block(x, cos, sin, AttentionContext())
    finally:
        for hk in hooks:
            hk.remove()
    for n, m in linears.items():
        result.clips[f"{prefix}.{n}"] = S.clip(m.weight, inputs[n])
    if isinstance(block.mlp, MoE):
        h2 = block.post_attention_layernorm(x + block.self_attn(block.input_layernorm(x), cos, sin, AttentionContext()))
        h2 = h2.reshape(-1, x.shape[-1])
        ex, Im = block.mlp.experts, block.mlp.experts.down_proj.shape[-1]
        clips: dict[str, list[torch.Tensor]] = {"gate_proj": [], "up_proj": [], "down_proj": []}
        for e, xe in _expert_inputs(block.mlp, h2, AWQResult(), ""):
            g, u = ex.gate_up_proj[e, :Im], ex.gate_up_proj[e, Im:]
            clips["gate_proj"].append(S.clip(g, xe))
            clips["up_proj"].append(S.clip(u, xe))
            clips["down_proj"].append(S.clip(ex.down_proj[e], F.silu(F.linear(xe, g)) * F.linear(xe, u)))
        result.clips[f"{prefix}.mlp.experts"] = {k: torch.stack(v) for k, v in clips.items()}


@torch.no_grad()
def awq_calibrate(model: nn.Module, calib: torch.Tensor | Sequence[Sequence[int]], group_size: int = 128,
                  zero_point: bool = True, progress: bool = True, n_grid: int = 20, clip: bool = True) -> AWQResult:
    """Fold AWQ scales into `model` (float, in place) and return the clip caps for `quantize_model`."""
    ids = calib if isinstance(calib, torch.Tensor) else torch.tensor([list(c) for c in calib])
    ids = ids.to(model.device)
    S, result = _Search(group_size, zero_point, n_grid), AWQResult()
    x = model.model.embed_tokens(ids)
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    cos, sin = model.model.rotary(pos)
    for i, block in enumerate(tqdm(model.model.layers, desc="AWQ calibration", disable=not progress)):
        prefix = f"model.layers.{i}"
        _scale_attention(block.self_attn, block.input_layernorm, x, cos, sin, S)
        x2 = x + block.self_attn(block.input_layernorm(x), cos, sin, AttentionContext())
        _scale_mlp(block, x2, S, result, prefix)
        if clip:
            _clip_block(block, x, cos, sin, S, result, prefix)
        x = block(x, cos, sin, AttentionContext())
    return result
