"""Routed experts with LoRA: per-expert (A, B) pairs through the grouped matmul.

DeepSeekMoE's routed experts are stacked ([E, out, in]); `ExpertsLoRA` keeps them stacked and adds one
adapter per expert, so the whole MoE layer stays one grouped matmul per projection. It is an
`ExpertWeights` like any other format: the MoE layer's one dispatch calls its `gate_up` / `down`.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3.layers.grouped import grouped_matmul
from dsv3.layers.moe import ExpertGroups, Experts, run_experts


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
        self.n_experts, self.first, self.count = base.n_experts, base.first, base.count
        self.all_reduce = base.all_reduce
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
        return grouped_matmul(grouped_matmul(h, self.lora_A[proj], offs), self.lora_B[proj], offs) * self.scaling[proj]

    def gate_up(self, x: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
        offs = groups.offs
        gu = grouped_matmul(x, self.base_layer.gate_up_proj, offs)
        live = {} if self.merged else self.lora_A
        if "gate_up_proj" in live:
            gu = gu + self._delta("gate_up_proj", x, offs).to(gu.dtype)
        if "gate_proj" in live or "up_proj" in live:
            gate, up = gu.chunk(2, dim=-1)
            if "gate_proj" in live:
                gate = gate + self._delta("gate_proj", x, offs).to(gate.dtype)
            if "up_proj" in live:
                up = up + self._delta("up_proj", x, offs).to(up.dtype)
            gu = torch.cat([gate, up], dim=-1)
        return gu

    def down(self, h: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
        y = grouped_matmul(h, self.base_layer.down_proj, groups.offs)
        if "down_proj" in self.lora_A and not self.merged:
            y = y + self._delta("down_proj", h, groups.offs).to(y.dtype)
        return y

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, D], idx/weights [N, K] -> [N, D], as `Experts.forward`, plus the adapters' deltas."""
        return run_experts(self, x, idx, weights)

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
