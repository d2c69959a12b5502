"""Cache specs: what one attention layer keeps per token, so caches are sized and laid out by what layers need.

A model lists one spec per attention layer (MTP layers included), `model.cache_specs()`. The engine
sizes its block pool from their bytes per token and allocates a `KVCache` by them; the block
manager hands out slots (blocks of `block_size` positions) that every layer uses at the same
index. MLA keeps one compressed latent plus one shared rotary key per token; other attention
kinds (an indexer's keys, a sliding window, compressed entries) add their own specs.

DeepSeek-V4 layers keep three kinds of state (kinds `window` and `compressed`; see
`dsv3.models.deepseek_v4.state`): a ring of the last `window` tokens' `width` values (per sequence, a
fixed size), one `width`-value entry (and `index_dim` indexer-key values) per `ratio` tokens, and
`state` fp32 values of compressor carry per sequence. `bytes_per_token` is then the long-run growth
(the compressed entries), `bytes_per_sequence` the whole of it at a given length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheSpec:
    """One layer's per-token cache entry: `width` values, stored as `parts` (each scaled on its own in int8), and
    `index_dim` indexer-key values beside them (DSA), kept in a tensor of their own because the indexer reads
    every past token's key while attention reads only the selected tokens' entries."""

    kind: str
    parts: tuple[int, ...]
    index_dim: int = 0
    window: int = 0  # V4: only the last `window` tokens' values are kept (a per-sequence ring); 0 = every token's
    ratio: int = 0  # V4: one entry of `width` values (+ `index_dim`) per `ratio` tokens; 0 = no compressed entries
    state: int = 0  # V4: fp32 values of compressor carry per sequence

    @property
    def width(self) -> int:
        return sum(self.parts)

    def bytes_per_token(self, dtype: torch.dtype, quantized: bool = False) -> int:
        """Bytes one token takes in this layer: int8 values plus an fp32 scale per part (and per index key), or
        `dtype` values."""
        if self.window or self.ratio:  # V4: the ring is a fixed size; entries grow one per `ratio` tokens
            if quantized:
                raise NotImplementedError("int8 caches of DeepSeek-V4 layers are not supported")
            return -(-self.bytes_per_entry(dtype) // self.ratio) if self.ratio else 0
        if quantized:
            return self.width + 4 * len(self.parts) + (self.index_dim + 4 if self.index_dim else 0)
        return (self.width + self.index_dim) * torch.empty((), dtype=dtype).element_size()

    def bytes_per_entry(self, dtype: torch.dtype) -> int:
        """One compressed entry (V4): its values and its indexer key; 0 without compression."""
        return (self.width + self.index_dim) * torch.empty((), dtype=dtype).element_size() if self.ratio else 0

    def bytes_per_sequence(self, dtype: torch.dtype, length: int) -> int:
        """All one sequence of `length` tokens keeps in this layer (V4: ring + entries + carry; else per token × length)."""
        if not (self.window or self.ratio):
            return self.bytes_per_token(dtype) * length
        es = torch.empty((), dtype=dtype).element_size()
        ring = (min(self.window, length) if self.window else length) * self.width * es
        return ring + (length // self.ratio) * self.bytes_per_entry(dtype) + 4 * self.state if self.ratio else ring


def mla_latent(kv_lora_rank: int, rope_dim: int) -> CacheSpec:
    """MLA: the normalised KV latent (kv_lora_rank) and the shared rotary key (rope_dim)."""
    return CacheSpec("mla_latent", (kv_lora_rank, rope_dim))


def mla_indexed(kv_lora_rank: int, rope_dim: int, index_dim: int) -> CacheSpec:
    """MLA with DeepSeek Sparse Attention (V3.2): the latent and rotary key, plus the indexer's key per token."""
    return CacheSpec("mla_indexed", (kv_lora_rank, rope_dim), index_dim)


def v4_window(head_dim: int, window: int) -> CacheSpec:
    """DeepSeek-V4 sliding-window layer: the ring of the last `window` tokens' K=V values (head_dim each)."""
    return CacheSpec("window", (head_dim,), window=window)


def v4_compressed(head_dim: int, window: int, ratio: int, state: int, index_dim: int = 0) -> CacheSpec:
    """DeepSeek-V4 compressed layer (HCA; CSA with `index_dim`): the window ring, one head_dim entry (+ indexer key)
    per `ratio` tokens, and `state` fp32 values of compressor carry per sequence."""
    return CacheSpec("compressed", (head_dim,), index_dim, window=window, ratio=ratio, state=state)
