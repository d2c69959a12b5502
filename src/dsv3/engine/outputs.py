"""What the engine returns: one `RequestOutput` per request, a `CompletionOutput` per continuation.

vLLM's shapes, so code written against vLLM's offline API reads these the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from dsv3.engine.sampling import SamplingParams
from dsv3.errors import DSV3Error

PromptType = Union[str, list[int], dict[str, Any]]  # text, token ids, or {"prompt_token_ids": [...]}


class RequestError(DSV3Error, ValueError):
    """A request that cannot be accepted (raised before anything is scheduled)."""


def check_prompt_ids(prompt_ids: list[int], vocab_size: int, max_model_len: int) -> None:
    """The checks every generation path applies to a prompt: non-empty, shorter than max_model_len, ids in the vocabulary."""
    if not prompt_ids:
        raise RequestError("the prompt is empty")
    if len(prompt_ids) >= max_model_len:
        raise RequestError(f"the prompt has {len(prompt_ids)} tokens; max_model_len is {max_model_len}")
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size:
        raise RequestError(f"prompt token ids must be in [0, {vocab_size})")


@dataclass(frozen=True)
class EngineRequest:
    """A request one engine has checked (`LLMEngine.validate`): queued as it is, never checked again.

    The server validates when it admits a request (so a bad one gets its 400 before anything is
    reserved) and hands this object on; the async front and `add_request` take it without a second
    tokenization or check. An `EngineRequest` from another engine (other vocabulary, other context
    length) is checked again.
    """

    prompt: str | None  # the text, when the prompt was given as text
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    max_new_tokens: int  # max_tokens, or what the context leaves
    checked_by: object = field(default=None, repr=False, compare=False)


@dataclass
class CompletionOutput:
    """One generated continuation (vLLM's shape)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None  # per token: the chosen token and the top-N


@dataclass
class RequestOutput:
    """All continuations of one prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    prompt_logprobs: list[dict[int, float] | None] | None = None  # None for the first prompt token
    error: str | None = None  # set when the engine stopped this request after an error
    error_is_input: bool = False  # ... caused by the request itself (e.g. a schema no output can finish)


@dataclass
class StreamEvent:
    """An increment of a streamed completion: new text, the token that produced it, and whether it ended."""

    text: str
    token_id: int | None
    finish_reason: str | None = None
