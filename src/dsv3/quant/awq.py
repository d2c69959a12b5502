"""AWQ (arXiv 2306.00978) for DeepSeek-V3 blocks: activation-aware scales, then clipping, before int4.

For each group of linears sharing one input, search s = x̄^α / w̄^(1−α) (α on a 20-point grid,
AutoAWQ's `duo_scaling`) minimising the group's output error with Q(W·diag(s))·diag(s)⁻¹, then fold:
the producer of the input (an RMSNorm, or the rows of the previous linear) is divided by s and
the consumers' input columns multiplied by s — the float model computes the same function.

Groups in a V3 block: input_layernorm → [q_a_proj | q_proj, kv_a_proj_with_mqa]; q_a_layernorm →
q_b_proj; kv_a_layernorm → kv_b_proj; value rows of kv_b_proj → o_proj; post_attention_layernorm →
dense gate/up, or → shared + all routed gate/up with the router's columns multiplied by s (it reads
the same normed input, so its logits — hence routing — are unchanged); up rows → down per expert.
A routed expert that no calibration token reaches is calibrated on *all* tokens (forced routing)
and reported, so it is neither a crash nor silently unscaled. Then per-group clipping of |W|
(AutoAWQ's grid, q/k-producing projections skipped). Layers are processed in order, each on the
float outputs of the previous one. MTP modules are quantized without calibration (round-to-nearest).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dsv3.model.attention import AttentionContext
from dsv3.model.layers import MLP
from dsv3.model.moe import Experts, MoE
from dsv3.quant.schemes import ceil_to, pseudo_quantize_int4


@dataclass
class AWQResult:
    clips: dict[str, object] = field(default_factory=dict)  # module name -> clip [N, G] (experts: per projection)
    forced_experts: dict[str, list[int]] = field(default_factory=dict)  # MoE name -> experts with no calib tokens

    def get(self, name: str, default=None):
        return self.clips.get(name, default)


class _Search:
    """The scale and clip searches, sharing the quantizer settings."""

    def __init__(self, group_size: int, zero_point: bool, n_grid: int = 20, max_shrink: float = 0.5, clip_tokens: int = 512):
        self.g, self.zp, self.n_grid, self.max_shrink, self.clip_tokens = group_size, zero_point, n_grid, max_shrink, clip_tokens

    def q(self, w: torch.Tensor) -> torch.Tensor:
        return pseudo_quantize_int4(w, self.g, self.zp)

    def scale(self, x: torch.Tensor, weights: Sequence[torch.Tensor], run: Callable[[list[torch.Tensor]], torch.Tensor]) -> torch.Tensor:
        """Best per-input-channel s [K] for the weights (input dim last) read by `run`."""
        K = x.shape[-1]
        x_mean = x.abs().float().reshape(-1, K).mean(0)
        rows = torch.cat([w.reshape(-1, K).float() for w in weights])
        Kp = ceil_to(K, self.g)
        grp = F.pad(rows.abs(), (0, Kp - K)).view(rows.shape[0], -1, self.g)
        w_mean = (grp / (grp.amax(-1, keepdim=True) + 1e-6)).view(rows.shape[0], Kp)[:, :K].mean(0)
        ref = run(list(weights)).float()
        best, best_s = float("inf"), torch.ones(K)
        for i in range(self.n_grid):
            a = i / self.n_grid
            s = (x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            cand = [(self.q(w.float() * s) / s).to(w.dtype) for w in weights]
            err = (run(cand).float() - ref).pow(2).mean().item()
            if err < best:
                best, best_s = err, s
        return best_s

    def clip(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per (row, group) cap on |w| minimising the group-wise output error on sampled inputs."""
        N, K = w.shape
        Kp = ceil_to(K, self.g)
        x = x.reshape(-1, K).float()
        x = x[:: max(1, x.shape[0] // self.clip_tokens)][: self.clip_tokens]
        xg = F.pad(x, (0, Kp - K)).view(x.shape[0], -1, self.g)  # [n, G, g]
        wg = F.pad(w.float(), (0, Kp - K)).view(N, -1, self.g)  # [N, G, g]
        ref = torch.einsum("ngk,ogk->ogn", xg, wg)
        org_max = wg.abs().amax(-1)
        best_err, best = torch.full_like(org_max, float("inf")), org_max.clone()
        for i in range(int(self.max_shrink * self.n_grid)):
            cap = org_max * (1 - i / self.n_grid)
            q = pseudo_quantize_int4(w.float(), self.g, self.zp, clip=cap)
            qg = F.pad(q, (0, Kp - K)).view(N, -1, self.g)
            err = (torch.einsum("ngk,ogk->ogn", xg, qg) - ref).pow(2).mean(-1)
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, cap, best)
        return best


@torch.no_grad()
def _fold_norm(norm: nn.Module, s: torch.Tensor, consumers: Sequence[torch.Tensor]) -> None:
    norm.weight.div_(s.to(norm.weight.dtype))
    for w in consumers:
        w.mul_(s.to(w.dtype))


def _moe_run(moe: MoE, h: torch.Tensor) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """MoE output with candidate [routed gate_up, shared gate, shared up]; routing fixed to the float router."""
    weights, idx, _ = moe.gate(h)
    sh = moe.shared_experts

    def run(ws: list[torch.Tensor]) -> torch.Tensor:
        fake = SimpleNamespace(gate_up_proj=ws[0], down_proj=moe.experts.down_proj)
        y = Experts.forward(fake, h, idx, weights.float())
        if sh is not None:
            y = y + F.linear(F.silu(F.linear(h, ws[1])) * F.linear(h, ws[2]), sh.down_proj.weight)
        return y
    return run


@torch.no_grad()
def _scale_block(block: nn.Module, x: torch.Tensor, cos, sin, S: _Search, result: AWQResult, prefix: str) -> None:
    attn = block.self_attn
    h = block.input_layernorm(x)
    first = [attn.q_proj if attn.q_lora_rank is None else attn.q_a_proj, attn.kv_a_proj_with_mqa]
    ws = [m.weight for m in first]
    s = S.scale(h, ws, lambda c: torch.cat([F.linear(h, w) for w in c], -1))
    _fold_norm(block.input_layernorm, s, ws)
    h = block.input_layernorm(x)
    if attn.q_lora_rank is not None:
        qa = attn.q_a_layernorm(attn.q_a_proj(h))
        s = S.scale(qa, [attn.q_b_proj.weight], lambda c: F.linear(qa, c[0]))
        _fold_norm(attn.q_a_layernorm, s, [attn.q_b_proj.weight])
    lat = attn.kv_a_layernorm(attn.kv_a_proj_with_mqa(h)[..., : attn.kv_lora_rank])
    s = S.scale(lat, [attn.kv_b_proj.weight], lambda c: F.linear(lat, c[0]))
    _fold_norm(attn.kv_a_layernorm, s, [attn.kv_b_proj.weight])
    o_in = _capture_input(attn.o_proj, lambda: attn(h, cos, sin, AttentionContext()))
    s = S.scale(o_in, [attn.o_proj.weight], lambda c: F.linear(o_in, c[0]))
    H, dn, dv = attn.n_heads, attn.nope_dim, attn.v_dim
    v_rows = (torch.arange(H)[:, None] * (dn + dv) + dn + torch.arange(dv)[None]).flatten()
    attn.kv_b_proj.weight[v_rows] /= s[:, None].to(attn.kv_b_proj.weight.dtype)
    attn.o_proj.weight.mul_(s.to(attn.o_proj.weight.dtype))
    x2 = x + attn(block.input_layernorm(x), cos, sin, AttentionContext())
    h2 = block.post_attention_layernorm(x2).reshape(-1, x.shape[-1])
    mlp = block.mlp
    if isinstance(mlp, MLP):
        ws = [mlp.gate_proj.weight, mlp.up_proj.weight]
        s = S.scale(h2, ws, lambda c: F.linear(F.silu(F.linear(h2, c[0])) * F.linear(h2, c[1]), mlp.down_proj.weight))
        _fold_norm(block.post_attention_layernorm, s, ws)
        _scale_down(S, block.post_attention_layernorm(x2).reshape(-1, x.shape[-1]), mlp)
        return
    sh = mlp.shared_experts
    ws = [mlp.experts.gate_up_proj] + ([sh.gate_proj.weight, sh.up_proj.weight] if sh is not None else [])
    run = _moe_run(mlp, h2)
    s = S.scale(h2, ws, run if sh is not None else (lambda c: run([c[0], None, None])))
    _fold_norm(block.post_attention_layernorm, s, ws)
    mlp.gate.weight.mul_(s.to(mlp.gate.weight.dtype))  # the router reads the same normed input
    h2 = block.post_attention_layernorm(x2).reshape(-1, x.shape[-1])
    if sh is not None:
        _scale_down(S, h2, sh)
    ex, Im = mlp.experts, mlp.experts.down_proj.shape[-1]
    for e, xe in _expert_inputs(mlp, h2, result, f"{prefix}.mlp"):
        up = ex.gate_up_proj[e, Im:]
        mid = F.silu(F.linear(xe, ex.gate_up_proj[e, :Im])) * F.linear(xe, up)
        s = S.scale(mid, [ex.down_proj[e]], lambda c: F.linear(mid, c[0]))
        up.div_(s[:, None].to(up.dtype))
        ex.down_proj[e].mul_(s.to(ex.down_proj.dtype))


def _scale_down(S: _Search, h: torch.Tensor, mlp: MLP) -> None:
    mid = F.silu(mlp.gate_proj(h)) * mlp.up_proj(h)
    s = S.scale(mid, [mlp.down_proj.weight], lambda c: F.linear(mid, c[0]))
    mlp.up_proj.weight.div_(s[:, None].to(mlp.up_proj.weight.dtype))
    mlp.down_proj.weight.mul_(s.to(mlp.down_proj.weight.dtype))


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
        scratch = AWQResult()
        for e, xe in _expert_inputs(block.mlp, h2, scratch, ""):
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
        _scale_block(block, x, cos, sin, S, result, prefix)
        if clip:
            _clip_block(block, x, cos, sin, S, result, prefix)
        x = block(x, cos, sin, AttentionContext())
    return result
