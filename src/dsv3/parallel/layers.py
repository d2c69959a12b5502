"""Parallel linear layers, vocabulary-parallel embedding and LM head (the layout of DeepSeek's inference code).

Column-parallel layers hold a slice of the output features and need no communication; row-parallel
layers hold a slice of the input features and all-reduce their partial products; the embedding
holds a slice of the vocabulary, zeroes ids it does not own and all-reduces; the head holds a
slice of the vocabulary and all-gathers logits. Each records which slice of the full checkpoint
tensor it holds (`shard`), which is all sharded loading needs to know.

The `Quant*` variants are the same layers over packed weights (`dsv3.quant.linear.QuantLinear`: int8,
int4 from dsv3/AutoAWQ/GPTQ/compressed-tensors files, FP8), their scales and zero points cut along the
same split as the weight (`dsv3.parallel.load.narrow_packed`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.layers.linear import Linear
from dsv3.parallel.dist import ParallelError, all_gather_last, all_reduce
from dsv3.quant.linear import QuantLinear


@dataclass(frozen=True)
class Shard:
    """The slice [start, end) along `dim` of the full weight that this rank holds."""

    dim: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


def split(n: int, parts: int, rank: int, what: str) -> tuple[int, int]:
    """Even contiguous split of n items; the sizes must divide (as DeepSeek's code asserts)."""
    if n % parts:
        raise ParallelError(f"{what} ({n}) is not divisible by the parallel size {parts}")
    k = n // parts
    return rank * k, (rank + 1) * k


class ColumnParallelLinear(Linear):
    """y_local = x W[start:end]ᵀ: this rank's output features; the next layer consumes them locally."""

    def __init__(self, in_features: int, out_features: int, parts: int, rank: int, what: str):
        start, end = split(out_features, parts, rank, what)
        super().__init__(in_features, end - start)
        self.shard = Shard(0, start, end)

    def native_form(self) -> None:
        """No native form: the single-process kernels do not take a shard (and its layer's peers communicate)."""
        return None


class RowParallelLinear(Linear):
    """y = Σ_ranks x_local W[:, start:end]ᵀ: partial products summed with one all-reduce."""

    def __init__(self, in_features: int, out_features: int, parts: int, rank: int, what: str):
        start, end = split(in_features, parts, rank, what)
        super().__init__(end - start, out_features)
        self.shard = Shard(1, start, end)

    def native_form(self) -> None:
        """No native form: the partial products must be all-reduced."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(F.linear(x, self.weight))


class VocabParallelEmbedding(nn.Module):
    """Rows [start, end) of the embedding; ids owned elsewhere contribute zeros before the all-reduce."""

    def __init__(self, vocab_size: int, dim: int, parts: int, rank: int):
        super().__init__()
        start, end = split(vocab_size, parts, rank, "vocab_size")
        self.shard = Shard(0, start, end)
        self.weight = nn.Parameter(torch.empty(end - start, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.shard.start) | (ids >= self.shard.end)
        local = (ids - self.shard.start).masked_fill(outside, 0)
        y = F.embedding(local, self.weight).masked_fill(outside[..., None], 0)
        return all_reduce(y)


class ParallelHead(Linear):
    """Logits for vocabulary rows [start, end), all-gathered so every rank sees the full [.., V] logits."""

    def __init__(self, dim: int, vocab_size: int, parts: int, rank: int):
        start, end = split(vocab_size, parts, rank, "vocab_size")
        super().__init__(dim, end - start)
        self.shard = Shard(0, start, end)
        self.on_call = None  # set by the multi-process engine on rank 0 (see dsv3.parallel.worker)

    def native_form(self) -> None:
        """No native form: the logits must be all-gathered."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_call is not None:
            self.on_call(x)
        return all_gather_last(F.linear(x, self.weight))


class QuantColumnParallelLinear(QuantLinear):
    """`ColumnParallelLinear` over packed weights: this rank's output rows of the packed matrix (and their scales)."""

    shard: Shard

    def native_form(self) -> None:
        return None


class QuantRowParallelLinear(QuantLinear):
    """`RowParallelLinear` over packed weights: this rank's input columns (whole int4 groups / FP8 blocks), partial
    products all-reduced (int8's per-row scale applies to every partial product alike)."""

    shard: Shard

    def native_form(self) -> None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(super().forward(x))


class QuantParallelHead(QuantLinear):
    """`ParallelHead` over a packed LM head: its vocabulary rows, logits all-gathered."""

    shard: Shard
    on_call = None

    def native_form(self) -> None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_call is not None:
            self.on_call(x)
        return all_gather_last(super().forward(x))


PACKED_VARIANT = {ColumnParallelLinear: QuantColumnParallelLinear, RowParallelLinear: QuantRowParallelLinear,
                  ParallelHead: QuantParallelHead}


def packed_like(local: nn.Module, packed: QuantLinear) -> QuantLinear:
    """`packed` (this rank's slice, already cut) as the parallel variant of the dense layer `local` it replaces."""
    cls = PACKED_VARIANT.get(type(local))
    if cls is None:
        return packed  # a replicated layer: the plain packed linear
    out = cls(packed.fmt, packed.in_features, packed.out_features, packed.tensors, act_dtype=packed.act_dtype)
    out.shard = local.shard
    return out
