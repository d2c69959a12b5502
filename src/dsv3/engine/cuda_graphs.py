"""CUDA graphs for decode steps: one graph per (batch bucket, context-width bucket), replayed from static buffers.

A decode step of B sequences is padded to the smallest captured batch bucket ≥ B (vLLM's sizes: 1, 2, 4,
8, then multiples of 8 up to 256) and its context to a width bucket (block_size · 2^k slots). Everything
the step's kernels read comes from one int64 device buffer [bucket, 4 + blocks]: token id, position,
write slot, context length, then the block table. The host packs it into pinned memory and sends it
with one non-blocking copy; inside the graph the block table becomes key slots and the lengths a key
mask (`StepMetadata` over those tensors), so a replay needs nothing from the host and the step has no
host synchronisation of its own -- the engine's one sync is reading the sampled tokens.

Padded rows write their latent to a scratch block the block manager never hands out (the runner
allocates one block more, `scratch_blocks`) and attend only to it. Steps that do not qualify --
prefill chunks, speculative verification, LoRA adapters, DSA indexers, more rows than the largest
bucket, tensor/expert parallelism -- run eagerly, as do all steps with DSV3_CUDA_GRAPHS=0. On a CPU
(`capture=False`) the same static-buffer step runs without a graph: the tests compare it with the
eager runner token for token.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("dsv3.engine")

MAX_GRAPHS = 64  # captured (batch, width) pairs kept; more distinct shapes run eagerly
COLS = 4  # token id, position, write slot, context length; then the block table


def batch_buckets(limit: int = 256) -> list[int]:
    """Batch sizes a graph is captured for: 1, 2, 4, 8, 16, 24, ... (multiples of 8) up to `limit`."""
    sizes = [1, 2, 4] + list(range(8, max(8, limit) + 1, 8))
    return [s for s in sizes if s <= max(1, limit)] or [1]


def pick(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding n, or None when n is larger than every bucket."""
    return next((b for b in buckets if b >= n), None)


def width_blocks(blocks: int) -> int:
    """Blocks of context a graph covers for a step needing `blocks`: the next power of two."""
    return 1 << max(0, blocks - 1).bit_length()


def enabled(device: torch.device) -> bool:
    """Graphs for this runner: a CUDA device, one process (no tensor/expert parallelism), DSV3_CUDA_GRAPHS unset or 1."""
    if torch.device(device).type != "cuda" or os.environ.get("DSV3_CUDA_GRAPHS", "1") == "0":
        return False
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1)


def scratch_blocks(device: torch.device) -> int:
    """Blocks the runner allocates beyond the block manager's: one scratch block where graphs run."""
    return 1 if enabled(device) else 0


def eligible(items: list[Any], multi_lora: bool, dsa: bool) -> bool:
    """A step a graph can run: every item one decode token that is sampled, the base model, no DSA indexer."""
    if multi_lora or dsa or not items:
        return False
    return all(len(it.token_ids) == 1 and it.start > 0 and it.sample and not it.all_logits and it.adapter == 0
               for it in items)


def pack(items: list[Any], bucket: int, blocks: int, block_size: int, scratch_block: int,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """The step's static buffer [bucket, COLS + blocks] (int64, host): per row token id, position, write slot,
    context length (position + 1), block table padded with the scratch block; padded rows decode a token at
    position 0 into the scratch block."""
    buf = out if out is not None else torch.empty(bucket, COLS + blocks, dtype=torch.int64)
    rows = []
    scratch = scratch_block * block_size
    for it in items:
        p = it.start
        table = it.block_table[: p // block_size + 1]
        rows.append([it.token_ids[0], p, table[p // block_size] * block_size + p % block_size, p + 1]
                    + table + [scratch_block] * (blocks - len(table)))
    pad = [0, 0, scratch, 1] + [scratch_block] * blocks
    rows += [pad] * (bucket - len(items))
    buf.copy_(torch.tensor(rows, dtype=torch.int64))
    return buf


def unpack(buf: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Static buffer -> (input_ids [1, B], positions [1, B], StepMetadata) with device-side slots and mask."""
    from dsv3.attention.metadata import StepMetadata

    B, blocks = buf.shape[0], buf.shape[1] - COLS
    pos = torch.arange(blocks * block_size, device=buf.device)
    tables = buf[:, COLS:]
    slots = tables[:, pos // block_size] * block_size + pos % block_size  # [B, width]
    mask = pos[None, :] < buf[:, 3:4]
    meta = StepMetadata(buf[:, 2], torch.arange(B, device=buf.device), slots, mask[:, None, None], [], None)
    return buf[:, 0][None], buf[:, 1][None], meta


@dataclass
class _Graph:
    buffer: torch.Tensor  # [bucket, COLS + blocks] on the device
    hidden: torch.Tensor  # [bucket, D]
    logits: torch.Tensor  # [bucket, V]
    graph: Any = None  # torch.cuda.CUDAGraph, or None (run eagerly on the static buffers)


class DecodeGraphs:
    """Captured decode steps of one ModelRunner (its model, cache and block size)."""

    def __init__(self, runner: Any, scratch_block: int, capture: bool | None = None, buckets: list[int] | None = None):
        self.runner, self.scratch_block = runner, scratch_block
        self.device = torch.device(runner.device)
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.buckets = buckets or batch_buckets()
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = None
        self._host: dict[tuple[int, int], torch.Tensor] = {}  # pinned staging buffers
        self.dsa = bool(getattr(runner.cache.spec, "index_dim", 0))
        self.stats = {"replays": 0, "captures": 0, "static": 0, "eager": 0}

    def _backend(self):
        from dsv3.attention.backend import backend_for

        return backend_for(self.device)

    def _forward(self, g: _Graph) -> None:
        """The step on the static buffers, written into g.hidden / g.logits (what a graph records)."""
        from dsv3.attention.context import PagedContext

        model = self.runner.model
        ids, pos, meta = unpack(g.buffer, self.runner.block_size)
        ctx = PagedContext(self.runner.cache, meta)
        ctx.backend = self._backend()
        hidden = model.hidden_states(ids, pos, ctx)[0]
        g.hidden.copy_(hidden)
        g.logits.copy_(model.lm_head(hidden))

    def _build(self, bucket: int, blocks: int) -> _Graph:
        model = self.runner.model
        cfg = model.config
        dev = self.device
        g = _Graph(torch.empty(bucket, COLS + blocks, dtype=torch.int64, device=dev),
                   torch.empty(bucket, cfg.hidden_size, dtype=model.dtype, device=dev),
                   torch.empty(bucket, cfg.vocab_size, dtype=model.dtype, device=dev))
        g.buffer.copy_(pack([], bucket, blocks, self.runner.block_size, self.scratch_block))
        if self.capture:
            stream = torch.cuda.Stream(dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: Triton compiles, cuBLAS picks its kernels, vendor kernels get checked
                    self._forward(g)
            torch.cuda.current_stream(dev).wait_stream(stream)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            g.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g.graph, pool=self.pool):
                self._forward(g)
            self.stats["captures"] += 1
            log.info("captured a decode CUDA graph for batch %d, %d context blocks", bucket, blocks)
        return g

    def staging(self, bucket: int, blocks: int) -> torch.Tensor:
        key = (bucket, blocks)
        if key not in self._host:
            self._host[key] = torch.empty(bucket, COLS + blocks, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        return self._host[key]

    def run(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(hidden [n, D], fp32 logits [n, V]) of a decode step from its graph, or None when the step runs eagerly."""
        if not eligible(items, self.runner.multi_lora, self.dsa):
            return None
        bucket = pick(len(items), self.buckets)
        if bucket is None:
            return None
        bs = self.runner.block_size
        blocks = width_blocks(max(it.start // bs + 1 for it in items))
        key = (bucket, blocks)
        g = self.graphs.get(key)
        if g is None:
            if len(self.graphs) >= MAX_GRAPHS:
                self.stats["eager"] += 1
                return None
            g = self.graphs[key] = self._build(bucket, blocks)
        host = pack(items, bucket, blocks, bs, self.scratch_block, out=self.staging(bucket, blocks))
        g.buffer.copy_(host, non_blocking=True)
        if g.graph is not None:
            g.graph.replay()
            self.stats["replays"] += 1
        else:
            with torch.inference_mode():
                self._forward(g)
            self.stats["static"] += 1
        n = len(items)
        # copies: the next replay overwrites the static outputs
        return g.hidden[:n].clone(), g.logits[:n].to(torch.float32, copy=True)
