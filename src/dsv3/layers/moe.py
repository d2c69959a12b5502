"""DeepSeekMoE: a router choosing K of E fine-grained experts per token, plus always-on shared experts.

The router supports DeepSeek-V3's bias-corrected, group-limited sigmoid routing (`noaux_tc`) and
DeepSeek-V2's softmax routing (`greedy`, `group_limited_greedy`). Routed experts are stored
stacked ([E, out, in], as transformers v5 does in memory) and run in bulk: (token, slot) pairs
are sorted by expert and fed to one grouped matmul — no Python loop over tokens or experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3 import ops
from dsv3.config import ModelConfig
from dsv3.layers.mlp import MLP
from dsv3.ops.forms import NativeExperts, NativeLinear, NativeRouter, f32_cpu


class Gate(nn.Module):
    """The router. Runs in fp32: near-tie expert choices must not flip with the activation dtype.

    `e_score_correction_bias` (aux-loss-free balancing) shifts scores for *selection only*; the
    weights applied to expert outputs come from the unbiased scores.
    """

    keep_fp32 = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_experts = cfg.num_experts_per_tok, cfg.n_routed_experts
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.scoring_func, self.topk_method = cfg.scoring_func, cfg.topk_method
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if self.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        else:
            self.e_score_correction_bias = None

    def native_form(self) -> NativeRouter | None:
        """The native router (sigmoid scores, `noaux_tc`) over fp32 weights, or None."""
        bias = self.e_score_correction_bias
        if self.scoring_func != "sigmoid" or self.topk_method != "noaux_tc" or not f32_cpu(self.weight, bias):
            return None
        return NativeRouter(self.weight, bias, self.n_group, self.topk_group, self.top_k, self.norm_topk_prob, self.scaling)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, K] fp32, expert ids [N, K], scores [N, E] fp32)."""
        if ops.native(x):
            routed = ops.route_noaux(x, self.native_form())  # decode: one call
            if routed is not None:
                return routed
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias.float()
        if self.topk_method != "greedy" and self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            group_scores = grouped.topk(2, dim=-1)[0].sum(-1) if self.topk_method == "noaux_tc" else grouped.amax(-1)
            drop = torch.ones_like(group_scores, dtype=torch.bool)
            drop.scatter_(1, group_scores.topk(self.topk_group, dim=-1)[1], False)
            choice = grouped.masked_fill(drop[..., None], float("-inf")).view_as(choice)
        idx = choice.topk(self.top_k, dim=-1)[1]
        weights = scores.gather(1, idx)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, idx, scores


@torch.library.custom_op("dsv3::grouped_mm", mutates_args=())
def _grouped_mm(x: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """F.grouped_mm as an opaque op, so torch.compile can trace the MoE on CPU in fp32
    (the op's own fake-tensor rule accepts only the bf16 CUDA case)."""
    return F.grouped_mm(x, w_t, offs=offs)


@_grouped_mm.register_fake
def _(x: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w_t.shape[-1])


@torch.library.custom_op("dsv3::grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-group x_gᵀ · grad_g -> [G, in, out]: the weight gradient of `_grouped_mm`."""
    return F.grouped_mm(x.t(), grad, offs=offs)


@_grouped_mm_wgrad.register_fake
def _(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor, groups: int) -> torch.Tensor:
    return x.new_empty(groups, x.shape[1], grad.shape[1])


def _grouped_mm_backward(ctx, grad: torch.Tensor):
    x, w_t, offs = ctx.saved_tensors
    dx = _grouped_mm(grad, w_t.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    dw = _grouped_mm_wgrad(x, grad, offs, w_t.shape[0]) if ctx.needs_input_grad[1] else None
    return dx, dw, None


def _grouped_mm_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


_grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by group, group g = rows [offs[g-1], offs[g]); w [G, out, in] -> [rows, out]."""
    aligned = (x.shape[-1] * x.element_size()) % 16 == 0 and (w.shape[1] * w.element_size()) % 16 == 0
    if aligned and x.dtype == w.dtype:
        if torch.compiler.is_compiling():
            return _grouped_mm(x, w.transpose(1, 2), offs)
        return F.grouped_mm(x, w.transpose(1, 2), offs=offs)
    # Fallback for odd widths/dtypes the grouped kernel rejects: one matmul per non-empty expert.
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ w[g].to(x.dtype).T
        start = end
    return out


class Experts(nn.Module):
    """E routed SwiGLU experts as stacked weights: gate_up_proj [E, 2·Im, D], down_proj [E, D, Im]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, Im = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * Im, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, Im))

    def native_form(self) -> NativeExperts | None:
        """fp32 stacked experts: gate and up both given as the fused gate_up_proj (the kernels take its first rows as
        gate, the rest as up), down as stored."""
        gu, down = self.gate_up_proj, self.down_proj
        if not f32_cpu(gu, down):
            return None
        return NativeExperts(NativeLinear(0, gu), NativeLinear(0, gu), NativeLinear(0, down))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, D], idx/weights [N, K] -> Σ_k weights[:, k] · expert_{idx[:, k]}(x), accumulated in fp32."""
        if ops.native(x):
            y = ops.experts(x, idx, weights, self.native_form())  # decode: one fused call
            if y is not None:
                return y
        N, K = idx.shape
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        token = order // K
        counts = torch.zeros(self.gate_up_proj.shape[0], dtype=torch.int32, device=x.device)
        offs = counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32)).cumsum(0, dtype=torch.int32)
        gate, up = grouped_linear(x[token], self.gate_up_proj, offs).chunk(2, dim=-1)
        y = grouped_linear(F.silu(gate) * up, self.down_proj, offs)
        y = y.float() * weights.flatten()[order, None]
        return torch.zeros(N, x.shape[-1], dtype=torch.float32, device=x.device).index_add_(0, token, y).to(x.dtype)


class MoE(nn.Module):
    """Routed experts + shared experts. Optionally records per-expert token counts (for balancing)."""

    keep_fp32 = True  # applies to its own buffer (expert_load) only; experts are submodules

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size) if cfg.n_shared_experts else None
        self.track_load = False
        self.register_buffer("expert_load", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.last_routing: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, idx, scores = self.gate(flat)
        if self.track_load:
            self.expert_load += torch.bincount(idx.flatten(), minlength=self.expert_load.numel()).to(self.expert_load.dtype)
            self.last_routing = (scores, idx)
        y = self.experts(flat, idx, weights.to(torch.float32))
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(shape)
