"""Where checkpoint slices land on a parallelized model: which parameters are sharded, and how.

A family's `parallelize` (e.g. `dsv3.models.deepseek_v3.shard`) swaps parallel modules into one model;
each records the slice of the full tensor it holds (`Shard`, or an `Experts` range and intermediate
slice). `localize` then tells the loader which slice of a checkpoint tensor this rank needs and
where it goes -- from the modules alone, whatever the family.
"""

from __future__ import annotations

from torch import nn

from dsv3.layers.moe import Experts
from dsv3.models.registry import family_of
from dsv3.parallel.dist import ParallelConfig
from dsv3.parallel.layers import Shard

# (destination index into the parameter, (dim, start, end) to narrow the source by, or None)
Placement = tuple[tuple, tuple[int, int, int] | None]


def parallelize(model: nn.Module, pc: ParallelConfig) -> nn.Module:
    """Swap this rank's parallel modules into `model` (built on the meta device: weights are loaded after), by the
    layout its model family defines."""
    return family_of(model).shard()(model, pc)


def owners(model: nn.Module) -> dict[str, nn.Module]:
    """Parameter name -> the parallel module owning it (only sharded parameters are listed)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, Experts) and m.all_reduce is not None:
            out[f"{name}.gate_up_proj"] = out[f"{name}.down_proj"] = m
        elif isinstance(getattr(m, "shard", None), Shard):
            out[f"{name}.weight"] = m
    return out


def localize(pname: str, index: tuple, owner: nn.Module | None) -> Placement | None:
    """Where checkpoint piece (pname, index) lands on this rank, or None if this rank does not hold it."""
    if owner is None:
        return index, None
    if not isinstance(owner, Experts):
        s = owner.shard
        return index, (s.dim, s.start, s.end)
    j = index[0]
    if not owner.first <= j < owner.first + owner.count:
        return None
    jl, inter = j - owner.first, owner.inter_shard
    if pname.endswith("down_proj"):
        return (jl,), None if inter is None else (1, inter.start, inter.end)
    rows = index[1]
    if inter is None:
        return (jl, rows), None
    part = 0 if rows.start == 0 else 1  # gate rows first, then up rows
    return (jl, slice(part * inter.size, (part + 1) * inter.size)), (0, inter.start, inter.end)


def pieces(owner: nn.Module | None, pname: str, cfg) -> int:
    """How many checkpoint tensors fill one local parameter."""
    if isinstance(owner, Experts):
        return owner.count * (2 if pname.endswith("gate_up_proj") else 1)
    if pname.endswith("experts.gate_up_proj"):
        return 2 * cfg.n_routed_experts
    if pname.endswith("experts.down_proj"):
        return cfg.n_routed_experts
    return 1
