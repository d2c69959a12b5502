"""Process-group setup: who am I, how many of us, and which collectives to call.

Either torchrun started every process (RANK/WORLD_SIZE/MASTER_ADDR in the environment, possibly
across hosts), or a single process spawns the others itself on 127.0.0.1. Compute runs on gloo
(CPU) or NCCL (GPU); step commands always travel over a second gloo group, because pickled
Python objects are CPU data and an idle server must be able to wait on them for a long time.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dsv3.errors import DSV3Error

COMPUTE_TIMEOUT = timedelta(minutes=10)
CONTROL_TIMEOUT = timedelta(days=7)  # workers wait on rank 0 between requests


class ParallelError(DSV3Error):
    """A parallel layout that cannot be honoured (sizes that do not divide the model, bad world size)."""


@dataclass(frozen=True)
class ParallelConfig:
    """TP splits attention heads, dense/shared MLPs and the vocabulary; EP partitions routed experts.

    Both span the same ranks (world = max(tp, ep)), as in DeepSeek's inference code: TP=2 with EP=2
    on two processes splits heads two ways and experts two ways. With EP=1 and TP>1 each expert's
    intermediate dimension is split instead (every rank holds a slice of every expert).
    """

    tp: int = 1
    ep: int = 1
    rank: int = 0

    def __post_init__(self):
        for name, v in (("tensor-parallel-size", self.tp), ("expert-parallel-size", self.ep)):
            if not isinstance(v, int) or v < 1:
                raise ParallelError(f"--{name} must be a positive integer, got {v!r}")
        if self.tp > 1 and self.ep > 1 and self.tp != self.ep:
            raise ParallelError(f"--tensor-parallel-size {self.tp} and --expert-parallel-size {self.ep} must be equal "
                                "when both exceed 1 (they share the same ranks)")
        if not 0 <= self.rank < self.world:
            raise ParallelError(f"rank {self.rank} is outside a world of {self.world} processes")

    @property
    def world(self) -> int:
        return max(self.tp, self.ep)

    @property
    def tp_rank(self) -> int:
        return self.rank if self.tp > 1 else 0

    @property
    def ep_rank(self) -> int:
        return self.rank if self.ep > 1 else 0


_control: dist.ProcessGroup | None = None


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, world: int, device: str = "cpu", addr: str | None = None, port: int | None = None) -> torch.device:
    """Join the process group (env:// under torchrun, else tcp://addr:port) and return this rank's device."""
    global _control
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count()))))
        torch.cuda.set_device(dev)
    if world == 1:
        return dev
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if addr is None:  # torchrun
            dist.init_process_group(backend, timeout=COMPUTE_TIMEOUT)
        else:
            dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world,
                                    timeout=COMPUTE_TIMEOUT)
    if dist.get_world_size() != world:
        raise ParallelError(f"the layout needs {world} processes but {dist.get_world_size()} were launched")
    _control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return dev


def control_group() -> dist.ProcessGroup | None:
    return _control


def shutdown() -> None:
    global _control
    if dist.is_initialized():
        dist.destroy_process_group()
    _control = None


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (no-op outside a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's x along the last dimension (rank order)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)
