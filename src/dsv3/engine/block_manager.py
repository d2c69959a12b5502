"""Paged allocation of the MLA latent cache, with automatic prefix caching.

The cache is cut into fixed-size blocks; a sequence owns a `block_table` of block ids. A full
block is identified by a hash chained over every token before it (plus the adapter id and an
optional cache salt), so two requests sharing a prefix share its blocks. Freed blocks keep their
hash and stay reusable until they are evicted in least-recently-freed order.

A model with per-sequence state (DeepSeek-V4's window ring and compressor carry, in a *state slot* the
manager hands out with the blocks) can resume only where that state was saved: `snapshots` (the model's
cache object) says which cached blocks have their end-of-block state kept, a prefix match stops at the
last such block, and a reused block's snapshot is dropped.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

from dsv3.engine.sequence import Sequence


def block_hash(parent: bytes, token_ids: list[int], adapter_id: int = 0, cache_salt: str | None = None) -> bytes:
    """Chained hash of one full block (the salt and adapter id enter the first block's hash)."""
    h = hashlib.blake2b(parent, digest_size=16)
    if not parent:
        h.update(f"adapter={adapter_id};salt={cache_salt}".encode())
    h.update(b"".join(t.to_bytes(4, "little") for t in token_ids))
    return h.digest()


class BlockManager:
    """Allocates blocks, shares cached prefixes, and counts prefix-cache queries and hits (in tokens)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, num_state_slots: int = 0):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_state_slots = list(range(num_state_slots - 1, -1, -1))  # per-sequence state (V4), popped from the end
        self.num_state_slots = num_state_slots
        self.snapshots: Any = None  # has / get / drop(block): end-of-block states of a stateful model
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.seq_hashes: dict[int, list[bytes]] = {}  # seq_id -> hashes of its full blocks
        self.seq_committed: dict[int, int] = {}  # seq_id -> how many of its blocks `commit` has registered
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def _hashes(self, seq: Sequence, upto_tokens: int) -> list[bytes]:
        hashes = self.seq_hashes.setdefault(seq.seq_id, [])
        bs = self.block_size
        while (len(hashes) + 1) * bs <= upto_tokens:
            i = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else b"", seq.token_ids[i * bs:(i + 1) * bs], seq.adapter_id, seq.cache_salt))
        return hashes[: upto_tokens // bs]

    def match_prefix(self, seq: Sequence) -> None:
        """On first scheduling: adopt cached blocks for the longest cached prefix (never the whole sequence)."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return
        usable = seq.num_tokens - 1  # at least one token must be computed to produce logits
        self.prefix_queries += seq.num_tokens
        matched = []
        for h in self._hashes(seq, usable):
            block = self.hash_to_block.get(h)
            if block is None:
                break
            matched.append(block)
        if self.snapshots is not None:  # resume only where the per-sequence state was kept
            while matched and not self.snapshots.has(matched[-1]):
                matched.pop()
            seq.restore_state = self.snapshots.get(matched[-1]) if matched else None
        for block in matched:
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        self.prefix_hits += seq.num_computed_tokens

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def ensure_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give `seq` room for `num_new_tokens` more cached tokens; False if there are not enough free blocks."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > len(self.free) or (self.num_state_slots and seq.state_slot < 0 and not self.free_state_slots):
            return False
        if self.num_state_slots and seq.state_slot < 0:
            seq.state_slot = self.free_state_slots.pop()
        for _ in range(need):
            block, _ = self.free.popitem(last=False)  # least recently freed first
            old = self.block_hashes[block]
            if old is not None and self.hash_to_block.get(old) == block:
                del self.hash_to_block[old]
            if self.snapshots is not None:
                self.snapshots.drop(block)
            self.block_hashes[block] = None
            self.ref_count[block] = 1
            seq.block_table.append(block)
        return True

    def commit(self, seq: Sequence) -> None:
        """Register the hashes of blocks that became full now that their tokens are computed."""
        if not self.enable_prefix_caching:
            return
        # a verified draft counts as computed before the engine appends it: hash only tokens the sequence holds.
        # Blocks registered by an earlier commit keep their hash while the sequence holds them: only new ones are
        # looked at (a step of 64 sequences walked every full block of each).
        hashes = self._hashes(seq, min(seq.num_computed_tokens, seq.num_tokens))
        for i in range(self.seq_committed.get(seq.seq_id, 0), len(hashes)):
            block, h = seq.block_table[i], hashes[i]
            if self.block_hashes[block] is None:
                self.block_hashes[block] = h
                self.hash_to_block.setdefault(h, block)
        self.seq_committed[seq.seq_id] = len(hashes)

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's references; unreferenced blocks join the free list (most recent last)."""
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
        seq.block_table = []
        self.seq_hashes.pop(seq.seq_id, None)
        self.seq_committed.pop(seq.seq_id, None)
        if seq.state_slot >= 0:
            self.free_state_slots.append(seq.state_slot)
            seq.state_slot = -1
