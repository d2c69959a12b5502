"""A sequence being generated: its tokens, how many are already in the cache, and its blocks."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from dsv3.engine.output import OutputTracker
from dsv3.engine.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One continuation of one request (a request with n=3 owns three sequences)."""

    seq_id: int
    request_id: str
    index: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    output: OutputTracker
    generator: torch.Generator | None = None
    adapter_id: int = 0
    cache_salt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose latent is in the cache
    block_table: list[int] = field(default_factory=list)
    state_slot: int = -1  # models with per-sequence state (DeepSeek-V4): the slot it holds while it has blocks
    restore_state: Any = None  # such models: the saved state (after its last cached block) the slot starts from
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache on first schedule
    first_token_time: float | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    prompt_logprobs: list[dict[int, float] | None] | None = None
    mtp_done: int = 0  # MTP pairs (h_i, x_{i+1}) already in the MTP layer's cache
    mtp_pending: torch.Tensor | None = None  # main hidden states h_mtp_done .. not yet fed to MTP
    spec_draft: list[int] | None = None  # drafts for the next step, made by the native speculative step
    spec_drafted: int = 0  # this request's drafted and accepted tokens (its own acceptance)
    spec_accepted: int = 0
    spec_off: bool = False  # acceptance fell below the break-even: no more drafts for this request
    pooler: Any = None  # a pooling request's dsv3.engine.pooling.Pooler (nothing is sampled)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def uses_prefix_cache(self) -> bool:
        """Whether cached prefix blocks may stand in for computing the prompt (not when every position's
        logits or hidden states are wanted)."""
        return self.params.prompt_logprobs is None and (self.pooler is None or self.pooler.uses_prefix_cache)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: forget the cache; prompt and generated tokens are recomputed later."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.restore_state = None
        self.mtp_done, self.mtp_pending, self.spec_draft = 0, None, None
        if self.pooler is not None:
            self.pooler.reset()
        self.status = SequenceStatus.WAITING
