"""DeepSeekMoE: a router choosing K of E fine-grained experts per token, plus always-on shared experts.

The router supports DeepSeek-V3's bias-corrected, group-limited sigmoid routing (`noaux_tc`),
DeepSeek-V2's softmax routing (`greedy`, `group_limited_greedy`) and DeepSeek-V4's `sqrtsoftplus`
scores (sqrt(softplus(logit)), always renormalised over the chosen experts as V4's inference code does);
V4's hash-routed layers use `dsv3.layers.hash_gate.HashGate` with the same experts.

The MoE layer is route -> dispatch -> experts -> combine, written once (`run_experts`): the
(token, slot) pairs routed to the experts this module holds are sorted by expert, the experts'
weights run SwiGLU on those groups of rows (`ExpertWeights.gate_up` / `down`), and the outputs are
added back per token, weighted, in fp32. What differs between weight formats -- dense fp32/bf16
stacks (`Experts`), packed int8/int4/FP8 (`dsv3.quant.experts.QuantExperts`), adapters
(`dsv3.lora.experts.ExpertsLoRA`) -- is only how a group of rows is multiplied. Tensor and expert
parallelism are the same layer holding a range of the experts ([first, first + count)) and/or a
slice of each expert's intermediate dimension, whose partial sums are then all-reduced.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from dsv3 import ops
from dsv3.config import ModelConfig
from dsv3.layers.grouped import grouped_linear, grouped_matmul
from dsv3.layers.mlp import MLP
from dsv3.ops.forms import NativeExperts, NativeLinear, NativeRouter, f32_cpu

__all__ = ["ExpertGroups", "ExpertWeights", "Experts", "Gate", "MoE", "grouped_linear", "run_experts", "score_fn"]


def score_fn(kind: str, logits: torch.Tensor) -> torch.Tensor:
    """Router scores from fp32 logits: sigmoid (V3), softmax (V2) or sqrt(softplus) (V4)."""
    if kind == "sigmoid":
        return logits.sigmoid()
    if kind == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    return logits.softmax(dim=-1)


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
        if x.is_cuda and self.scoring_func == "sigmoid" and self.topk_method == "noaux_tc":
            routed = ops.route_gpu(x, self.weight, self.e_score_correction_bias, self.n_group, self.topk_group,
                                   self.top_k, self.norm_topk_prob, self.scaling)  # one Triton kernel
            if routed is not None:
                return routed
        logits = F.linear(x.float(), self.weight.float())
        scores = score_fn(self.scoring_func, logits)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias.float()
        if self.topk_method != "greedy" and self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            group_scores = grouped.topk(2, dim=-1)[0].sum(-1) if self.topk_method == "noaux_tc" else grouped.amax(-1)
            drop = torch.ones_like(group_scores, dtype=torch.bool)
            drop.scatter_(1, group_scores.topk(self.topk_group, dim=-1)[1], False)
            choice = grouped.masked_fill(drop[..., None], float("-inf")).view_as(choice)
        idx = choice.topk(self.top_k, dim=-1)[1]
        weights = scores.gather(1, idx)
        if self.norm_topk_prob and (self.top_k > 1 or self.scoring_func == "sqrtsoftplus"):
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, idx, scores


@dataclass
class ExpertGroups:
    """Rows sorted by local expert: `counts[e]` rows of expert `first + e`, in that order."""

    counts: torch.Tensor  # [count] int64

    @cached_property
    def offs(self) -> torch.Tensor:
        """Cumulative row ends [count] int32 (grouped_mm's `offs`)."""
        return self.counts.cumsum(0).to(torch.int32)

    @cached_property
    def sizes(self) -> list[int]:
        return self.counts.tolist()

    @cached_property
    def active(self) -> torch.Tensor:
        """Local ids of the experts that got rows."""
        return self.counts.nonzero().flatten()


@runtime_checkable
class ExpertWeights(Protocol):
    """Routed experts' weights in some format: what `run_experts` needs from them.

    They hold experts [first, first + count) of `n_experts` (all of them unless expert-parallel), each
    possibly a slice of the intermediate dimension (tensor-parallel); `all_reduce` then sums the ranks'
    partial outputs. `gate_up` maps rows grouped by expert to [rows, 2·I] (gate, then up), `down`
    [rows, I] to [rows, D]; both must be differentiable in their input when autograd records.
    """

    n_experts: int
    first: int
    count: int
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None

    def gate_up(self, x: torch.Tensor, groups: ExpertGroups) -> torch.Tensor: ...

    def down(self, h: torch.Tensor, groups: ExpertGroups) -> torch.Tensor: ...

    def native_form(self) -> NativeExperts | None: ...


def run_experts(experts: ExpertWeights, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                swiglu_limit: float = 0.0) -> torch.Tensor:
    """Σ_k weights[:, k] · expert_{idx[:, k]}(x) over the experts `experts` holds, accumulated in fp32:
    x [N, D], idx / weights [N, K] -> [N, D] (summed over ranks when the experts are sharded). `swiglu_limit` > 0
    clamps the gate pre-activation to <= limit and the up one to [-limit, limit] (DeepSeek-V4)."""
    sharded = experts.all_reduce is not None
    if not sharded and not swiglu_limit and x.is_cpu and not torch.is_grad_enabled():  # decode: one native call
        y = ops.experts(x, idx, weights, experts.native_form())
        if y is not None:
            return y
    if not sharded and x.is_cuda and isinstance(experts, Experts) and experts.count == experts.n_experts:
        y = ops.experts_gpu(x, idx, weights, experts.gate_up_proj, experts.down_proj)  # fused Triton MoE, sync-free
        if y is not None:
            return y
    N, K = idx.shape
    flat = idx.flatten()
    if sharded or experts.count != experts.n_experts:  # keep the pairs routed to the experts held here
        local = flat - experts.first
        pairs = ((local >= 0) & (local < experts.count)).nonzero().flatten()
        local = local[pairs]
        order = local.argsort(stable=True)
        pairs, local = pairs[order], local[order]
    else:
        pairs = flat.argsort(stable=True)
        local = flat[pairs]
    out = torch.zeros(N, x.shape[-1], dtype=torch.float32, device=x.device)
    if pairs.numel():
        token = pairs // K
        groups = ExpertGroups(torch.bincount(local, minlength=experts.count))
        gate, up = experts.gate_up(x[token], groups).chunk(2, dim=-1)
        if swiglu_limit:
            gate, up = gate.clamp(max=swiglu_limit), up.clamp(-swiglu_limit, swiglu_limit)
        y = experts.down(F.silu(gate) * up, groups)
        w = weights.flatten()[pairs, None]
        y = y * w if y.dtype == torch.float32 and w.dtype == torch.float32 else y.float() * w.float()
        out = out.index_add(0, token, y) if torch.is_grad_enabled() else out.index_add_(0, token, y)
    if sharded:
        out = experts.all_reduce(out)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


class Experts(nn.Module):
    """Routed SwiGLU experts as stacked weights: gate_up_proj [E, 2·Im, D], down_proj [E, D, Im].

    A tensor/expert-parallel rank holds experts [first, first + count) and, with `inter`, the slice
    [inter.start, inter.end) of each one's intermediate dimension (set by `dsv3.parallel`).
    """

    def __init__(self, n_experts: int, dim: int, inter: int, first: int = 0, count: int | None = None,
                 inter_shard=None):
        super().__init__()
        self.n_experts, self.first = n_experts, first
        self.count = n_experts if count is None else count
        self.inter_shard = inter_shard
        self.all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        im = inter_shard.size if inter_shard is not None else inter
        self.gate_up_proj = nn.Parameter(torch.empty(self.count, 2 * im, dim))
        self.down_proj = nn.Parameter(torch.empty(self.count, dim, im))

    def gate_up(self, x: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
        return grouped_matmul(x, self.gate_up_proj, groups.offs)

    def down(self, h: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
        return grouped_matmul(h, self.down_proj, groups.offs)

    def native_form(self) -> NativeExperts | None:
        """fp32 stacked experts: gate and up both given as the fused gate_up_proj (the kernels take its first rows as
        gate, the rest as up), down as stored. None for a shard (its outputs must be all-reduced)."""
        gu, down = self.gate_up_proj, self.down_proj
        if self.all_reduce is not None or self.count != self.n_experts or not f32_cpu(gu, down):
            return None
        return NativeExperts(NativeLinear(0, gu), NativeLinear(0, gu), NativeLinear(0, down))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, D], idx/weights [N, K] -> Σ_k weights[:, k] · expert_{idx[:, k]}(x), accumulated in fp32."""
        return run_experts(self, x, idx, weights)

    def extra_repr(self) -> str:
        held = "" if self.count == self.n_experts else f", experts=[{self.first}, {self.first + self.count})"
        inter = "" if self.inter_shard is None else f", inter=[{self.inter_shard.start}, {self.inter_shard.end})"
        return f"n_experts={self.n_experts}{held}{inter}"


class LoadTracking(nn.Module):
    """A routed layer that can count its tokens per expert (`expert_load`) and keep its last routing (unbiased
    scores, chosen experts) while `track_load` is on: what the trainer's balancing reads (`dsv3.train.balance`)."""

    keep_fp32 = True  # applies to its own buffer (expert_load) only; experts are submodules

    def _init_load(self, n_experts: int) -> None:
        self.track_load = False
        self.register_buffer("expert_load", torch.zeros(n_experts), persistent=False)
        self.last_routing: tuple[torch.Tensor, torch.Tensor] | None = None

    def _record(self, scores: torch.Tensor, idx: torch.Tensor) -> None:
        if self.track_load:
            self.expert_load += torch.bincount(idx.flatten(), minlength=self.expert_load.numel()).to(self.expert_load.dtype)
            self.last_routing = (scores, idx)


class MoE(LoadTracking):
    """Routed experts + shared experts. Optionally records per-expert token counts (for balancing)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size) if cfg.n_shared_experts else None
        self._init_load(cfg.n_routed_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, idx, scores = self.gate(flat)
        self._record(scores, idx)
        y = self.experts(flat, idx, weights.to(torch.float32))
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(shape)
