"""DeepSeek-V4's decoding state, contiguous per sequence: what each attention layer keeps between steps.

One `V4State` holds `batch` sequences advancing together (same length, no padding) through a set of layers
(the main ones, or the MTP ones: they lag the main model by a token, so they get a state of their own).
Per layer (`LayerState`, all tensors batch-first):

    per token    ring           [B, sliding_window, head_dim]   K=V of the last `sliding_window` tokens, position p in
                                                                 slot p mod sliding_window (the official layout)
    per entry    entries        [B, max_len // ratio, head_dim]  compressed entry w (tokens [w·ratio, (w+1)·ratio)) at w
                 index_keys     [B, max_len // ratio, index_head_dim]   CSA only: the indexer's compressed keys
    per sequence carry_kv/score [B, coff·ratio, coff·head_dim]  fp32 compressor carry (`dsv3.layers.compressor.pool`):
                                                                 rows [0, ratio) the last complete window (CSA's
                                                                 overlap), then the incomplete window's rows
                 index_carry_*  [B, 2·ratio, 2·index_head_dim]  CSA only: the indexer compressor's carry

(coff = 2 for CSA, whose windows overlap, else 1.) Entries 0 .. length // ratio − 1 are valid; the ring's
min(length, sliding_window) newest slots are. `cache_specs()` of the model declares the same sizes
(`dsv3.attention.spec.v4_window` / `v4_compressed`), for a paged layout to follow. A forward without a
cache runs on a fresh state sized to its sequence (`V4State.fresh`), so a full forward and incremental
decoding are one code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dsv3.layers.compressor import empty_carry


@dataclass
class LayerState:
    """One V4 layer's state for B sequences (see the module docstring for the layout)."""

    ring: torch.Tensor
    entries: torch.Tensor | None = None
    carry_kv: torch.Tensor | None = None
    carry_score: torch.Tensor | None = None
    index_keys: torch.Tensor | None = None
    index_carry_kv: torch.Tensor | None = None
    index_carry_score: torch.Tensor | None = None


class V4State:
    """The contiguous state of `batch` sequences of up to `max_len` tokens over `layers` (model layer indices: the
    main layers by default, `mtp=True` for the MTP modules')."""

    def __init__(self, model: Any, batch: int, max_len: int, mtp: bool = False, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        cfg = model.config
        dtype, device = dtype or model.dtype, device or model.device
        L = cfg.num_hidden_layers
        self.layer_ids = list(range(L, L + model.num_mtp_layers)) if mtp else list(range(L))
        self.batch, self.max_len, self.length, self._step = batch, max_len, 0, 0
        hd, win = cfg.head_dim, cfg.sliding_window
        self.layers: dict[int, LayerState] = {}
        for i in self.layer_ids:
            st = LayerState(torch.zeros(batch, win, hd, dtype=dtype, device=device))
            r = cfg.compress_ratio(i)
            if r:
                n = max_len // r
                overlap = cfg.layer_types[i] == "compressed_sparse_attention"
                st.entries = torch.zeros(batch, n, hd, dtype=dtype, device=device)
                st.carry_kv, st.carry_score = empty_carry(batch, r, hd, overlap, device)
                if overlap:
                    st.index_keys = torch.zeros(batch, n, cfg.index_head_dim, dtype=dtype, device=device)
                    st.index_carry_kv, st.index_carry_score = empty_carry(batch, r, cfg.index_head_dim, True, device)
            self.layers[i] = st

    @classmethod
    def fresh(cls, model: Any, batch: int, num_tokens: int, mtp: bool = False) -> "V4State":
        """A state for one whole-sequence forward (no cache kept afterwards)."""
        return cls(model, batch, num_tokens, mtp)

    def layer(self, layer_idx: int) -> LayerState:
        return self.layers[layer_idx]

    def begin_step(self, num_tokens: int) -> None:
        if self.length + num_tokens > self.max_len:
            raise ValueError(f"sequence length {self.length + num_tokens} exceeds the state's size {self.max_len}")
        self._step = num_tokens

    def end_step(self) -> None:
        self.length += self._step
        self._step = 0

    def nbytes(self) -> int:
        """Bytes the state holds (all layers, all sequences)."""
        return sum(t.nbytes for st in self.layers.values() for t in vars(st).values() if t is not None)
