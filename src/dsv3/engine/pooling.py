"""Pooling requests: a prompt's final hidden states pooled into one vector (`/v1/embeddings`, `LLM.embed`).

vLLM's shape: `PoolingParams` instead of `SamplingParams`, a `PoolingRequestOutput` whose
`outputs.data` is the vector. A pooling request runs through the same engine steps as a generation
(batched with them, chunked prefill included) and finishes when its last prompt token has been
computed; nothing is sampled. The hidden states pooled are the model's final ones, after the final
RMSNorm (what the LM head reads). `mean` averages every prompt position, so such a request bypasses
the prefix cache (a cached token has no hidden state here); `last` takes the last position, which
is always computed, so it shares cached prefixes. The vector is L2-normalised; `dimensions` keeps
the first d values and renormalises (Matryoshka-style truncation -- a causal LM was not trained for
it, so a truncated vector is a coarser summary, not an equivalent one).

These are a causal language model's pooled states, not a trained embedding model's: good enough to
rank near-duplicate or paraphrased code above unrelated code, not a replacement for a retrieval
model trained with a contrastive objective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dsv3.engine.outputs import EngineRequest, RequestError, check_prompt_ids
from dsv3.engine.sampling import SamplingParams

POOLING_TYPES = ("mean", "last")
# what a pooling sequence carries where a generation carries its SamplingParams: one greedy slot, never sampled
POOLING_SAMPLING = SamplingParams(max_tokens=1, temperature=0.0)


@dataclass
class PoolingParams:
    """How to pool one prompt (vLLM's name). `dimensions`: keep the first d values (then renormalise)."""

    pooling_type: str = "mean"
    normalize: bool = True
    dimensions: int | None = None
    n: int = field(default=1, init=False, repr=False)  # one output per prompt, as a generation with n=1

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise RequestError(f"pooling_type must be one of {', '.join(POOLING_TYPES)}, got {self.pooling_type!r}")
        if self.dimensions is not None and (isinstance(self.dimensions, bool) or not isinstance(self.dimensions, int)
                                            or self.dimensions < 1):
            raise RequestError(f"dimensions must be a positive integer, got {self.dimensions!r}")


@dataclass
class PoolingOutput:
    data: torch.Tensor  # [D] (or [dimensions]), float32

    @property
    def embedding(self) -> list[float]:
        return self.data.tolist()


@dataclass
class PoolingRequestOutput:
    """One pooled prompt (vLLM's shape); `outputs` is None while unfinished or after an error."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: PoolingOutput | None
    finished: bool = True
    error: str | None = None
    error_is_input: bool = False


def validate(engine: Any, prompt: Any, params: PoolingParams) -> EngineRequest:
    """`LLMEngine.validate` for a pooling request: a non-empty prompt of at most max_model_len tokens in the
    vocabulary; `dimensions` at most the hidden size."""
    text, ids = engine._encode(prompt)
    cfg = engine.model.config
    check_prompt_ids(ids, cfg.vocab_size, engine.max_model_len + 1)  # nothing is generated: the whole context is usable
    if params.dimensions is not None and params.dimensions > cfg.hidden_size:
        raise RequestError(f"dimensions={params.dimensions} exceeds the model's hidden size {cfg.hidden_size}")
    return EngineRequest(text, tuple(ids), params, 0, checked_by=engine)


class Pooler:
    """One sequence's running pool over the hidden states of its prompt positions, chunk by chunk."""

    def __init__(self, params: PoolingParams, num_prompt_tokens: int):
        self.params, self.n = params, num_prompt_tokens
        self.total: torch.Tensor | None = None
        self.last: torch.Tensor | None = None

    def reset(self) -> None:
        """Preempted (its positions will be computed again): forget what was pooled."""
        self.total = self.last = None

    @property
    def uses_prefix_cache(self) -> bool:
        return self.params.pooling_type == "last"

    def add(self, start: int, hidden: torch.Tensor) -> None:
        """Hidden states [n, D] of positions start..start+n-1 (prompt positions only are pooled)."""
        rows = hidden[: max(0, self.n - start)].float()
        if not len(rows):
            return
        s = rows.sum(0)
        self.total = s if self.total is None else self.total + s
        if start + len(rows) == self.n:
            self.last = rows[-1].clone()

    def result(self) -> torch.Tensor:
        v = self.last if self.params.pooling_type == "last" else self.total / self.n
        if v is None:
            raise RuntimeError("a pooling request finished before its last prompt position was computed")
        v = v.detach().cpu()
        if self.params.dimensions is not None:
            v = v[: self.params.dimensions]
        if self.params.normalize:
            v = v / v.norm().clamp_min(1e-12)
        return v.contiguous()

    def output(self, request_id: str, prompt: str | None, prompt_ids: list[int], finished: bool,
               error: str | None, error_is_input: bool) -> PoolingRequestOutput:
        data = PoolingOutput(self.result()) if finished and error is None else None
        return PoolingRequestOutput(request_id, prompt, list(prompt_ids), data, finished, error, error_is_input)
