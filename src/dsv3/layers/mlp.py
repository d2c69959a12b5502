"""The SwiGLU MLP: dense layers and shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3 import kernels
from dsv3.kernels.layers import mlp_decode


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) ⊙ up(x)). Used for dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.usable(x):  # a decode step: one native call (fp32 or int8 projections)
            y = mlp_decode(self, x)
            if y is not None:
                return y
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
