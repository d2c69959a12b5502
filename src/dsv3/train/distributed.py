"""Data parallelism under torchrun: one process per device, gradients averaged every step.

The model is called through `hidden_states`/`mtp_hidden` rather than `forward`, so instead of
wrapping it in DistributedDataParallel the loop all-reduces the gradients itself once per
optimizer step (after accumulation — the same communication DDP's `no_sync` pattern does).
The expert-load counts are summed over ranks too, so every rank moves the router biases by
the same ±γ and the replicas never drift apart.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from dsv3.layers.moe import MoE


class DataParallel:
    """Rank/world from torchrun's environment; a no-op when WORLD_SIZE is 1 or unset."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.world > 1:
            if device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average_gradients(self, model: torch.nn.Module) -> None:
        """grad ← mean over ranks, as one flat buffer (a missing grad counts as zeros)."""
        if self.world == 1:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def sum_expert_loads(self, moes: list[MoE]) -> None:
        if self.world > 1 and moes:
            flat = torch.cat([m.expert_load for m in moes])
            dist.all_reduce(flat)
            for m, part in zip(moes, flat.split([m.expert_load.numel() for m in moes])):
                m.expert_load.copy_(part)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average logged scalars over ranks (rank-local micro-batch means → global mean)."""
        if self.world == 1:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(values, (t / self.world).tolist()))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
