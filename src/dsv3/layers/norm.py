"""RMSNorm: y = w ⊙ x / rms(x), normalised in fp32 as HF and the checkpoints expect."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3 import ops


class RMSNorm(nn.Module):
    """y = w ⊙ x / rms(x). Normalises in fp32, casts back, then scales — as HF and the checkpoints expect."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # nothing to cast: one call
            y = ops.rms_norm(x, self.weight, self.eps)
            return y if y is not None else F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        var = (xf * xf).sum(-1, keepdim=True).div_(xf.shape[-1])  # = pow(2).mean(); `mean` costs ~10x more on small rows
        return self.weight * (xf * torch.rsqrt(var + self.eps)).to(x.dtype)
