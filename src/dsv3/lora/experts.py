"""Routed experts with LoRA: per-expert (A, B) pairs through the grouped matmul, and its CPU backward.

DeepSeekMoE's routed experts are stacked ([E, out, in]); `ExpertsLoRA` keeps them stacked and adds one
adapter per expert, so the whole MoE layer stays one grouped matmul per projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.layers.moe import Experts, grouped_linear


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

    def native_form(self) -> None:
        """No native form: the adapters' deltas run in PyTorch."""
        return None

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
