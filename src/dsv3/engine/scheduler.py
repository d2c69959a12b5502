"""The scheduler: which sequences run in the next step, and how many of their tokens.

One token budget per step (`max_num_batched_tokens`) is shared by decodes and prefill chunks, as
in vLLM V1: running sequences first in arrival order (a decode costs one token, an unfinished
prefill continues with its next chunk), then waiting sequences first-come first-served. When the
cache runs out of blocks, the most recently arrived running sequence is preempted and will be
recomputed later (its prefix is usually still in the prefix cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from dsv3.engine.block_manager import BlockManager
from dsv3.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # first position computed in this step
    num_tokens: int

    @property
    def completes(self) -> bool:
        """Whether this chunk reaches the sequence's last token (so its logits are sampled)."""
        return self.start + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True):
        self.bm = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Forget a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.release(seq)

    def _preempt(self, victim: Sequence) -> None:
        self.running.remove(victim)
        self.bm.release(victim)
        victim.reset_for_recompute()
        self.waiting.appendleft(victim)
        self.num_preemptions += 1

    def _split_at_block(self, seq: Sequence, n: int) -> int:
        """With per-sequence state and prefix caching, a prompt's last chunk stops at its last block boundary first
        (the rest follows next step), so the state there is saved for later requests that share the prompt."""
        if self.bm.snapshots is None or not self.bm.enable_prefix_caching:
            return n
        start, bs = seq.num_computed_tokens, self.bm.block_size
        boundary = seq.num_prompt_tokens // bs * bs
        return boundary - start if start < boundary < start + n else n

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:  # preempted below by an earlier sequence
                continue
            n = self._split_at_block(seq, min(seq.num_tokens - seq.num_computed_tokens, budget))
            while not self.bm.ensure_slots(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING or seq not in self.running:
                continue
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table and seq.uses_prefix_cache:  # cached tokens have no logits (or hidden states)
                self.bm.match_prefix(seq)
                seq.num_cached_prompt_tokens = max(seq.num_cached_prompt_tokens, min(seq.num_computed_tokens, seq.num_prompt_tokens))
            remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining > budget and not self.enable_chunked_prefill:
                break
            n = self._split_at_block(seq, min(remaining, budget))
            if not self.bm.ensure_slots(seq, n):
                if seq.block_table:  # a waiting sequence holds no blocks (its prefix is matched again later),
                    self.bm.prefix_hits -= seq.num_computed_tokens  # or two of them could each hold what the other
                    self.bm.prefix_queries -= seq.num_tokens  # needs (counted again when it is matched again)
                    self.bm.release(seq)
                    seq.reset_for_recompute()
                    seq.num_cached_prompt_tokens = 0
                if not self.running:  # nothing to free: cannot fit at all
                    raise RuntimeError("the KV cache is too small for a single sequence chunk")
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            budget -= n
        return chunks
