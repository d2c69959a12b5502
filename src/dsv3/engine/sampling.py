"""Sampling parameters (vLLM/OpenAI names and semantics) and a batched sampler.

`sample` works on a [B, V] block of logits with per-row parameters, so the single-request
generator and the batching engine share one implementation. Each row draws from its own
`torch.Generator`, which is what makes a seeded request reproducible whatever else is batched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from dsv3 import ops
from dsv3.errors import DSV3Error


GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS: dividing logits by a smaller temperature overflows to inf


class SamplingError(DSV3Error, ValueError):
    """Invalid sampling parameters."""


@dataclass
class SamplingParams:
    """How to decode one request. temperature 0 (below 1e-5, as in vLLM) means greedy; top_k 0 or -1 disables top-k."""

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False  # keep the matched stop string at the end of the text (vLLM)
    skip_special_tokens: bool = True  # leave special tokens out of the text (vLLM)
    logits_processors: list[Callable] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise SamplingError(msg)

        if not isinstance(self.n, int) or self.n < 1 or self.n > 128:
            bad(f"n must be an integer in [1, 128], got {self.n!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens <= 0):
            bad(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            bad(f"min_tokens must be in [0, max_tokens], got {self.min_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")  # > vocab: no limit
        if not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if not -2 <= self.presence_penalty <= 2 or not -2 <= self.frequency_penalty <= 2:
            bad("presence_penalty and frequency_penalty must be in [-2, 2]")
        if self.seed is not None and (not isinstance(self.seed, int) or not -(1 << 63) <= self.seed < 1 << 64):
            bad(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            bad(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            bad(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 20):
                bad(f"{name} must be an integer in [0, 20], got {v!r}")
        if not all(callable(f) for f in self.logits_processors):
            bad("logits_processors must be callables (output_token_ids, logits) -> logits")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], seen: torch.Tensor, out_counts: torch.Tensor) -> torch.Tensor:
    """Repetition (HF: divide positive / multiply negative logits of seen tokens), presence and frequency (OpenAI) penalties."""
    rep = torch.tensor([p.repetition_penalty for p in params], device=logits.device)[:, None]
    pres = torch.tensor([p.presence_penalty for p in params], device=logits.device)[:, None]
    freq = torch.tensor([p.frequency_penalty for p in params], device=logits.device)[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    return logits - freq * out_counts - pres * (out_counts > 0)


def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, as -inf masks over a [B, V] block."""
    dev = logits.device
    temp = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=dev)[:, None]
    # extreme penalties can push logits to +-inf: keep +inf as the largest finite value (so a softmax stays a
    # distribution over the favoured tokens) and NaN as impossible
    logits = torch.nan_to_num(logits / temp, nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    top_k = torch.tensor([min(p.top_k, logits.shape[-1]) if p.top_k > 0 else logits.shape[-1] for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    min_p = torch.tensor([p.min_p for p in params], device=dev)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=dev)[None]
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly above each token
    drop = (ranks >= top_k[:, None]) | (before >= top_p[:, None]) | (probs < min_p[:, None] * probs[:, :1])
    drop[:, 0] = False
    return logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))


def greedy_choice(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of each row, a NaN never chosen (first index on ties, as argmax). On CPU `max` finds it in about
    half argmax's time and only rows whose maximum is NaN are redone; on an accelerator one fused pass without a
    host sync."""
    if logits.device.type != "cpu":
        return torch.nan_to_num(logits, nan=float("-inf")).argmax(-1)
    native = ops.greedy(logits) if logits.dim() == 2 else None  # fp32: one pass per row in C
    if native is not None:
        return native
    values, choice = logits.max(-1)
    bad = values.isnan()
    if bool(bad.any()):
        choice = torch.where(bad, torch.nan_to_num(logits, nan=float("-inf")).argmax(-1), choice)
    return choice


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """Pick one token per row: argmax for greedy rows, else a draw from the filtered distribution.

    Sampling uses the exponential race (argmax p/E, E ~ Exp(1)), equivalent to a categorical draw,
    with each row's noise from its own generator.
    """
    logits = logits.float()
    choice = greedy_choice(logits)
    if not all(p.greedy for p in params):  # decided on the host: no device sync for an all-greedy batch
        greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        probs = filter_logits(logits, params).softmax(-1)
        noise = torch.stack([torch.empty(logits.shape[-1], device=logits.device).exponential_(generator=g) for g in generators])
        choice = torch.where(greedy, choice, (probs / noise).argmax(-1))
    return choice
