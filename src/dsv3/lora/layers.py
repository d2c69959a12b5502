"""LoRA layers: y = W x + s · B (A dropout(x)), with W frozen and only A [r, in], B [out, r] trained.

`LoRALinear` wraps an `nn.Linear` and stores its adapters *stacked* ([slots, r, in], [slots, out, r])
so that a batch can later carry one adapter id per sequence (weights gathered by index, as
Punica/S-LoRA do); training and single-adapter inference use slot 0. `ExpertsLoRA` does the same for
DeepSeekMoE's stacked routed experts, one (A, B) pair per expert, through the grouped matmul.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model.moe import Experts, grouped_linear


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA (arXiv 2312.03732), as PEFT computes it."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def init_lora_(a: torch.Tensor, b: torch.Tensor) -> None:
    """PEFT's default init: A Kaiming-uniform (a=√5, as nn.Linear), B zero — the adapter starts as a no-op."""
    with torch.no_grad():
        for i in range(a.shape[0]):
            nn.init.kaiming_uniform_(a[i], a=math.sqrt(5))
        b.zero_()


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus low-rank adapters; `dense_weight()` serves MLA's absorbed decode."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 slots: int = 1):
        super().__init__()
        self.base_layer = base
        self.r, self.lora_alpha, self.use_rslora = r, alpha, use_rslora
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.zeros(slots, r, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(slots, base.out_features, r, **kw))
        self.register_buffer("scaling", torch.full((slots,), lora_scaling(alpha, r, use_rslora), device=base.weight.device),
                             persistent=False)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.slot_ids: torch.Tensor | None = None  # [B] adapter slot per sequence, -1 = base; None = slot 0
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def delta_weight(self, slot: int = 0) -> torch.Tensor:
        """s · B @ A in fp32 ([out, in]); fp32 so merging a bf16 model does not round the product twice."""
        return (self.lora_B[slot].float() @ self.lora_A[slot].float()) * self.scaling[slot].float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        h = self.lora_dropout(x).to(self.lora_A.dtype)
        if self.slot_ids is None:
            delta = F.linear(F.linear(h, self.lora_A[0]), self.lora_B[0]) * self.scaling[0]
        else:  # per-sequence adapters: gather each row's (A, B, s); slot -1 contributes nothing
            ids = self.slot_ids.to(x.device)
            if x.shape[0] != ids.shape[0]:  # MoE flattens [B, T, D] to [B·T, D] for the shared experts
                ids = ids.repeat_interleave(x.shape[0] // ids.shape[0])
            idx = ids.clamp(min=0)
            s = (self.scaling[idx] * (ids >= 0)).view(-1, *([1] * (x.dim() - 1)))
            lat = torch.einsum("b...i,bri->b...r", h, self.lora_A[idx])
            delta = torch.einsum("b...r,bor->b...o", lat, self.lora_B[idx]) * s
        return y + delta.to(y.dtype)

    def dense_weight(self) -> torch.Tensor:
        """W + s·BA in the weight dtype: what MLA's absorbed attention folds into queries and outputs."""
        w = self.base_layer.weight
        if self.merged:
            return w
        if self.slot_ids is not None and bool((self.slot_ids != self.slot_ids[0]).any()):
            raise RuntimeError("absorbed MLA needs one kv_b_proj weight per batch; a mixed-adapter batch must use per-slot attention")
        slot = 0 if self.slot_ids is None else int(self.slot_ids[0])
        if slot < 0:
            return w
        return (w.float() + self.delta_weight(slot)).to(w.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False


class _GroupedFrozen(torch.autograd.Function):
    """Grouped matmul with a frozen weight: backward is one more grouped matmul (dx = dy · W_g), no dW."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w, offs)
        return grouped_linear(x, w, offs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w, offs = ctx.saved_tensors
        return grouped_linear(grad.contiguous(), w.transpose(1, 2), offs), None, None


def grouped(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`grouped_linear`, but differentiable on every backend when autograd is recording.

    torch's CPU `grouped_mm` has no working backward, and the CUDA kernel takes bf16 only: frozen expert
    weights get a hand-written backward; trainable (LoRA) ones run one matmul per non-empty expert.
    """
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    kernel_ok = x.dtype == w.dtype and (x.dtype == torch.bfloat16 or not x.is_cuda)
    if kernel_ok and (not needs_grad or x.is_cuda):
        return grouped_linear(x, w, offs)
    if kernel_ok and not w.requires_grad:  # frozen experts: keep the grouped kernel, supply its backward
        return _GroupedFrozen.apply(x, w, offs)
    sizes = torch.diff(offs.long(), prepend=offs.new_zeros(1).long()).tolist()
    parts = [chunk @ w[g].to(x.dtype).T for g, chunk in enumerate(torch.split(x, sizes)) if chunk.shape[0]]
    return torch.cat(parts) if parts else x.new_zeros(0, w.shape[1])


# Where each adaptable projection sits in the stacked expert weights: (parameter, row slice kind).
EXPERT_PROJ = {"gate_proj": ("gate_up_proj", "first"), "up_proj": ("gate_up_proj", "second"),
               "gate_up_proj": ("gate_up_proj", "all"), "down_proj": ("down_proj", "all")}


class ExpertsLoRA(nn.Module):
    """Routed experts with per-expert adapters: A [E, r, in], B [E, out, r] per projection.

    Projections are `gate_proj`/`up_proj`/`down_proj` (PEFT's per-expert names) or the fused
    `gate_up_proj` (PEFT's `target_parameters` on transformers v5). With no projections it is just an
    autograd-safe wrapper around frozen experts, which training needs on CPU. Keeps `Experts.forward`'s
    signature, so the MoE block is unchanged.
    """

    def __init__(self, base: Experts, specs: dict[str, tuple[int, float]], dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        E, two_im, D = base.gate_up_proj.shape
        self.im = two_im // 2
        dims = {"gate_proj": (D, self.im), "up_proj": (D, self.im), "gate_up_proj": (D, two_im), "down_proj": (self.im, D)}
        kw = dict(dtype=base.gate_up_proj.dtype, device=base.gate_up_proj.device)
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        for proj, (r, scaling) in specs.items():
            d_in, d_out = dims[proj]
            self.lora_A[proj] = nn.Parameter(torch.zeros(E, r, d_in, **kw))
            self.lora_B[proj] = nn.Parameter(torch.zeros(E, d_out, r, **kw))
            self.scaling[proj] = scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def _delta(self, proj: str, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        h = self.lora_dropout(x).to(self.lora_A[proj].dtype)
        return grouped(grouped(h, self.lora_A[proj], offs), self.lora_B[proj], offs) * self.scaling[proj]

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, D], idx/weights [N, K] -> [N, D], as `Experts.forward`, plus the adapters' deltas."""
        base, N, K = self.base_layer, idx.shape[0], idx.shape[1]
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        token = order // K
        offs = torch.bincount(flat, minlength=base.gate_up_proj.shape[0]).cumsum(0).to(torch.int32)
        xs = x[token]
        gu = grouped(xs, base.gate_up_proj, offs)
        live = {} if self.merged else self.lora_A
        if "gate_up_proj" in live:
            gu = gu + self._delta("gate_up_proj", xs, offs).to(gu.dtype)
        gate, up = gu.chunk(2, dim=-1)
        if "gate_proj" in live:
            gate = gate + self._delta("gate_proj", xs, offs).to(gate.dtype)
        if "up_proj" in live:
            up = up + self._delta("up_proj", xs, offs).to(up.dtype)
        h = F.silu(gate) * up
        y = grouped(h, base.down_proj, offs)
        if "down_proj" in live:
            y = y + self._delta("down_proj", h, offs).to(y.dtype)
        y = y.float() * weights.flatten()[order, None]
        return torch.zeros(N, x.shape[-1], dtype=torch.float32, device=x.device).index_add(0, token, y).to(x.dtype)

    def delta_weight(self, proj: str) -> torch.Tensor:
        """[E, out, in] fp32 update of one projection."""
        return torch.bmm(self.lora_B[proj].float(), self.lora_A[proj].float()) * self.scaling[proj]

    def _target(self, proj: str) -> torch.Tensor:
        param, rows = EXPERT_PROJ[proj]
        w = getattr(self.base_layer, param)
        return w[:, : self.im] if rows == "first" else w[:, self.im:] if rows == "second" else w

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            for proj in self.lora_A:
                t = self._target(proj)
                t.copy_((t.float() + self.delta_weight(proj)).to(t.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            for proj in self.lora_A:
                t = self._target(proj)
                t.copy_((t.float() - self.delta_weight(proj)).to(t.dtype))
            self.merged = False
