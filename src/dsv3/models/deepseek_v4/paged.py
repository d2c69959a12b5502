"""DeepSeek-V4 under the paged engine: per-sequence rings and carries in state slots, compressed entries paged.

A V4 layer keeps three kinds of state (see `state.py`). Two of them have a fixed size per sequence -- the
sliding window's ring of the last `sliding_window` K=V rows and the compressors' fp32 carry -- so the engine
gives every running sequence one *state slot* (`PagedV4State.slots`, a `V4State` with one row per slot).
The third grows with the sequence -- one compressed entry (+ an indexer key on CSA layers) per `ratio`
tokens -- and is paged like MLA's latents: a block of `block_size` positions (a multiple of every ratio)
holds `block_size // ratio` entries of each compressed layer, at pool rows
`block_table[w·ratio // block_size] · (block_size // ratio) + (w·ratio mod block_size) // ratio`.
So a sequence's memory is its slot plus its blocks' entries, and cache bytes per token are what
`CacheSpec.bytes_per_token` says: entries only.

`SequenceStates` (dsv3.attention.context) carries one step's sequences (state slot, first position, token
count, block table). A step runs the prefill chunks one sequence at a time through the same layer code as a
full forward (the slot's ring and carries as views, the entries through `PagedRows`), and the single-token
decodes of all other sequences as one batch (`Attention.decode`), which reads the ring, scores the indexer
keys, gathers only the top-k entries (CSA) or every visible entry (HCA), and writes completed entries in place.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from dsv3.models.deepseek_v4.state import LayerState, V4State


class PagedRows:
    """A paged entry pool seen as one sequence's contiguous [1, n, d] store (what the full-forward code indexes):
    `rows` maps entry w to its pool row. Reads gather, writes scatter."""

    def __init__(self, pool: torch.Tensor, rows: torch.Tensor):
        self.pool, self.rows, self.dtype = pool, rows, pool.dtype

    @staticmethod
    def _span(key: Any) -> slice:
        if not (isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None) and isinstance(key[1], slice)):
            raise TypeError("paged entries are indexed as [:, a:b]")
        return key[1]

    def __getitem__(self, key: Any) -> torch.Tensor:
        return self.pool[self.rows[self._span(key)]][None]

    def __setitem__(self, key: Any, value: torch.Tensor) -> None:
        self.pool[self.rows[self._span(key)]] = value[0].to(self.pool.dtype)


class PagedV4State:
    """The engine's V4 cache: `num_slots` state slots (rings, carries) and paged entry pools per compressed layer."""

    def __init__(self, model: Any, num_slots: int, num_blocks: int, block_size: int, max_snapshots: int = 0):
        cfg = model.config
        ratios = {cfg.compress_ratio(i) for i in range(cfg.num_hidden_layers + model.num_mtp_layers)} - {0}
        bad = [r for r in ratios if block_size % r]
        if bad:
            raise ValueError(f"block_size {block_size} must be a multiple of every compression ratio ({sorted(ratios)})")
        self.block_size, self.num_slots = block_size, num_slots
        self.max_snapshots = max_snapshots
        self.snapshots: OrderedDict[int, list[torch.Tensor]] = OrderedDict()  # block id -> slot state at its end
        self.slots = V4State(model, num_slots, 0)  # entries of size 0: they live in the pools below
        # the MTP module's layers (one token behind the main model: a state of their own in the same slot index)
        self.mtp = V4State(model, num_slots, 0, mtp=True) if model.num_mtp_layers else None
        self.main_layers = set(self.slots.layers)
        self.layers: dict[int, LayerState] = {**self.slots.layers, **(self.mtp.layers if self.mtp else {})}
        self.ratios = {i: cfg.compress_ratio(i) for i in self.layers}
        self.entries: dict[int, torch.Tensor] = {}
        self.index_keys: dict[int, torch.Tensor] = {}
        for i, st in self.layers.items():
            r = cfg.compress_ratio(i)
            if not r:
                continue
            rows = num_blocks * block_size // r
            self.entries[i] = torch.zeros(rows, cfg.head_dim, dtype=st.ring.dtype, device=st.ring.device)
            if st.index_keys is not None:
                self.index_keys[i] = torch.zeros(rows, cfg.index_head_dim, dtype=st.ring.dtype, device=st.ring.device)

    def reset(self, slot: int, mtp: bool = False) -> None:
        """A fresh sequence in `slot` (the main layers', or with `mtp` the MTP layers' state): empty carries (the
        ring is only read where it was written)."""
        for st in (self.mtp.layers if mtp else self.slots.layers).values():
            for kv, score in ((st.carry_kv, st.carry_score), (st.index_carry_kv, st.index_carry_score)):
                if kv is not None:  # as `empty_carry`: zeros, and -inf scores (an absent window weighs nothing)
                    kv[slot].zero_()
                    score[slot].fill_(float("-inf"))

    def _slot_tensors(self, ring: bool = True) -> list[torch.Tensor]:
        return [t for st in self.layers.values() for t in ((st.ring,) if ring else ()) + (
            st.carry_kv, st.carry_score, st.index_carry_kv, st.index_carry_score) if t is not None]

    def checkpoint(self, slots: list[int], whole: list[bool]) -> list[tuple[int, list[torch.Tensor]]]:
        """What a step may overwrite in its slots, so a step that raises can be re-run exactly: the carries (a
        decode's ring write only replaces the position that leaves the window), and the ring too where `whole`
        (a prefill chunk overwrites ring rows that it also reads)."""
        out = []
        for slot, w in zip(slots, whole):
            out.append((slot, [t[slot].clone() for t in self._slot_tensors(ring=w)]))
        return out

    def rollback(self, saved: list[tuple[int, list[torch.Tensor]]], whole: list[bool]) -> None:
        for (slot, tensors), w in zip(saved, whole):
            for t, s in zip(self._slot_tensors(ring=w), tensors):
                t[slot].copy_(s)

    # ---- prefix caching: the slot's state at the end of a cached block ----------------------------
    def save(self, slot: int, block: int) -> None:
        """Keep a copy of `slot`'s ring and carries as the state after `block` (least recently used dropped past
        `max_snapshots`)."""
        if not self.max_snapshots:
            return
        self.snapshots[block] = [t[slot].clone() for t in self._slot_tensors()]
        self.snapshots.move_to_end(block)
        while len(self.snapshots) > self.max_snapshots:
            self.snapshots.popitem(last=False)

    def has(self, block: int) -> bool:
        return block in self.snapshots

    def get(self, block: int) -> list[torch.Tensor] | None:
        """The state saved after `block` (a sequence that matched it holds on to it until it is loaded)."""
        snap = self.snapshots.get(block)
        if snap is not None:
            self.snapshots.move_to_end(block)
        return snap

    def load(self, slot: int, snapshot: list[torch.Tensor]) -> None:
        """Resume a sequence in `slot` from a saved state (`get`): its ring and carries as they were there."""
        for t, saved in zip(self._slot_tensors(), snapshot):
            t[slot].copy_(saved)

    def drop(self, block: int) -> None:
        """`block` is reused for other tokens: its snapshot no longer describes it."""
        self.snapshots.pop(block, None)

    def entry_rows(self, block_tables: torch.Tensor, ratio: int, n: int) -> torch.Tensor:
        """Pool rows of entries 0..n-1 for each sequence: block_tables [B, nb] (padded) -> [B, n] int64."""
        bs = self.block_size
        tok = torch.arange(n, device=block_tables.device) * ratio
        blk = (tok // bs).clamp(max=max(block_tables.shape[1] - 1, 0))
        return block_tables[:, blk] * (bs // ratio) + (tok % bs) // ratio

    def layer_view(self, layer_idx: int, slot: int, rows: dict[int, torch.Tensor]) -> LayerState:
        """One sequence's `LayerState`: its slot's ring and carries (views, so writes land in place) and its
        entries as `PagedRows` (rows per ratio: [n] for this sequence)."""
        st = self.layers[layer_idx]
        one = slice(slot, slot + 1)
        view = LayerState(st.ring[one])
        if layer_idx in self.entries:
            r = self.ratios[layer_idx]
            view.entries = PagedRows(self.entries[layer_idx], rows[r])
            view.carry_kv, view.carry_score = st.carry_kv[one], st.carry_score[one]
            if layer_idx in self.index_keys:
                view.index_keys = PagedRows(self.index_keys[layer_idx], rows[r])
                view.index_carry_kv, view.index_carry_score = st.index_carry_kv[one], st.index_carry_score[one]
        return view

    def nbytes(self) -> int:
        """Bytes held: slots (rings + carries), entry pools and prefix-cache snapshots."""
        return (self.slots.nbytes() + (self.mtp.nbytes() if self.mtp else 0) + sum(t.nbytes for t in (*self.entries.values(), *self.index_keys.values()))
                + sum(t.nbytes for snap in self.snapshots.values() for t in snap))
