"""The SwiGLU MLP: dense layers and shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3 import ops
from dsv3.layers.linear import Linear, native_form
from dsv3.ops.forms import NativeLinear


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) ⊙ up(x)). Used for dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = Linear(dim, inter_dim)
        self.up_proj = Linear(dim, inter_dim)
        self.down_proj = Linear(inter_dim, dim)

    def native_form(self) -> tuple[NativeLinear, NativeLinear, NativeLinear] | None:
        forms = tuple(native_form(p) for p in (self.gate_proj, self.up_proj, self.down_proj))
        return None if None in forms else forms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ops.native(x):  # a decode step: one native call (fp32, int8 or int4 projections)
            forms = self.native_form()
            y = None if forms is None else ops.mlp(x, *forms)
            if y is not None:
                return y
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
