"""Turning sampled tokens into text and finish decisions, shared by the generator and the engine.

Stop strings may span token boundaries, so the tracker keeps `len(longest stop) - 1` characters
back from a stream until it knows they do not start a stop string, and cuts the stop string out
(or keeps it, with `include_stop_str_in_output`). As in vLLM, neither stop tokens nor stop strings
end a sequence before `min_tokens`: a stop string counts only if it ends after the text of the
`min_tokens`-th token.
"""

from __future__ import annotations

from dsv3.engine.sampling import SamplingParams
from dsv3.io.tokenizer import IncrementalDetokenizer, Tokenizer


class OutputTracker:
    """Follows one generated sequence: its tokens, its text, and whether (and why) it finished."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
                 eos_ids: set[int], max_new_tokens: int):
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids)
        self.max_new = max_new_tokens
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens)
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish_reason: str | None = None
        self.stop_after = 0  # a stop string must end past this many characters (the text before min_tokens)

    @property
    def banned_ids(self) -> list[int]:
        """Tokens that may not be sampled yet (stop tokens before `min_tokens`)."""
        return sorted(self.stop_ids) if len(self.token_ids) < self.params.min_tokens else []

    def append(self, token: int) -> str:
        """Record a sampled token; return the text that became safe to emit."""
        self.token_ids.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return self._emit(len(self.text))
        self.text += self.detok.push(token)
        if len(self.token_ids) < self.params.min_tokens:
            self.stop_after = len(self.text)
        else:
            hits = [(i, s) for s in self.params.stop
                    if (i := self.text.find(s, max(0, self.emitted - self.holdback, self.stop_after - len(s) + 1))) >= 0]
            if hits:
                i, s = min(hits)
                self.finish_reason = "stop"
                self.text = self.text[: i + len(s) if self.params.include_stop_str_in_output else i]
                return self._emit(len(self.text))
        if len(self.token_ids) >= self.max_new:
            self.finish_reason = "length"
            self.text += self.detok.flush()
            return self._emit(len(self.text))
        return self._emit(max(self.emitted, self.stop_after, len(self.text) - self.holdback))

    def _emit(self, upto: int) -> str:
        piece = self.text[self.emitted:upto]
        self.emitted = upto
        return piece
