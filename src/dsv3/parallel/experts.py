"""Routed experts held by one rank: a contiguous range of experts (EP) or a slice of every expert (TP).

Every rank sees all tokens (attention outputs are replicated after their all-reduce), so instead of
exchanging tokens with all-to-all each rank runs the (token, slot) pairs routed to its own experts
and the partial routed sums are added with one fp32 all-reduce — DeepSeek's inference layout.
With EP = 1 and TP > 1 each rank holds the intermediate slice [i0, i1) of every expert: gate/up
are column-parallel and down is row-parallel inside each expert, and the same all-reduce applies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.layers.moe import grouped_linear
from dsv3.parallel.dist import all_reduce
from dsv3.parallel.layers import Shard


class LocalExperts(nn.Module):
    """Experts [first, first + count) of E, each holding intermediate slice `inter` (None = all of it).

    Same call as `dsv3.layers.moe.Experts`: forward(x [N, D], idx [N, K], weights [N, K]) -> [N, D].
    """

    def __init__(self, n_experts: int, first: int, count: int, dim: int, inter: int, inter_shard: Shard | None = None):
        super().__init__()
        self.n_experts, self.first, self.count = n_experts, first, count
        self.inter_shard = inter_shard
        im = inter_shard.size if inter_shard is not None else inter
        self.gate_up_proj = nn.Parameter(torch.empty(count, 2 * im, dim))
        self.down_proj = nn.Parameter(torch.empty(count, dim, im))

    def native_form(self) -> None:
        """No native form: the partial sums must be all-reduced across ranks."""
        return None

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        N, K = idx.shape
        flat = idx.flatten()
        pairs = ((flat >= self.first) & (flat < self.first + self.count)).nonzero().flatten()
        local = flat[pairs] - self.first
        order = local.argsort(stable=True)
        pairs = pairs[order]
        out = torch.zeros(N, x.shape[-1], dtype=torch.float32, device=x.device)
        if pairs.numel():
            token = pairs // K
            offs = torch.bincount(local, minlength=self.count).cumsum(0).to(torch.int32)
            gate, up = grouped_linear(x[token], self.gate_up_proj, offs).chunk(2, dim=-1)
            y = grouped_linear(F.silu(gate) * up, self.down_proj, offs)
            out.index_add_(0, token, y.float() * weights.flatten()[pairs, None])
        return all_reduce(out).to(x.dtype)

    def extra_repr(self) -> str:
        inter = "" if self.inter_shard is None else f", inter=[{self.inter_shard.start}, {self.inter_shard.end})"
        return f"experts=[{self.first}, {self.first + self.count}) of {self.n_experts}{inter}"
