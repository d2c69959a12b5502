"""Cache specs: what one attention layer keeps per token, so caches are sized and laid out by what layers need.

A model lists one spec per attention layer (MTP layers included), `model.cache_specs()`. The engine
sizes its block pool from their bytes per token and allocates a `KVCache` by them; the block
manager hands out slots (blocks of `block_size` positions) that every layer uses at the same
index. MLA keeps one compressed latent plus one shared rotary key per token; other attention
kinds (an indexer's keys, a sliding window, compressed entries) add their own specs.
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

    @property
    def width(self) -> int:
        return sum(self.parts)

    def bytes_per_token(self, dtype: torch.dtype, quantized: bool = False) -> int:
        """Bytes one token takes in this layer: int8 values plus an fp32 scale per part (and per index key), or
        `dtype` values."""
        if quantized:
            return self.width + 4 * len(self.parts) + (self.index_dim + 4 if self.index_dim else 0)
        return (self.width + self.index_dim) * torch.empty((), dtype=dtype).element_size()


def mla_latent(kv_lora_rank: int, rope_dim: int) -> CacheSpec:
    """MLA: the normalised KV latent (kv_lora_rank) and the shared rotary key (rope_dim)."""
    return CacheSpec("mla_latent", (kv_lora_rank, rope_dim))


def mla_indexed(kv_lora_rank: int, rope_dim: int, index_dim: int) -> CacheSpec:
    """MLA with DeepSeek Sparse Attention (V3.2): the latent and rotary key, plus the indexer's key per token."""
    return CacheSpec("mla_indexed", (kv_lora_rank, rope_dim), index_dim)
