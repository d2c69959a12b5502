"""Structured output: a grammar (xgrammar) masks the logits at every step, so the output must parse.

`response_format` json_object / json_schema and forced tool calls compile to an xgrammar grammar
over the model's own vocabulary. A `GrammarProcessor` is a per-request logits processor
(`(output_token_ids, logits_row) -> logits_row`, the engine's hook); it keeps one matcher per
distinct output prefix, because the `n` sequences of a request share the processor but diverge.
"""

from __future__ import annotations

import json
import threading
from functools import lru_cache
from typing import Any

import torch

from dsv3.serve.errors import APIError
from dsv3.serve.utf8 import Utf8Masks, tail_state


class GrammarBackend:
    """xgrammar's tokenizer info and compiler for one tokenizer, built once per server."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]):
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast

        self.xgr = xgr
        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
        self.info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids))
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self.vocab_size = vocab_size
        # xgrammar's JSON strings admit raw control characters, which JSON forbids: mask those tokens out
        # (tool-call grammars keep bare "\n", which their fixed layout needs)
        vocab = self.info.decoded_vocab
        ctrl = [any(b < 0x20 for b in v) for v in vocab] + [False] * (vocab_size - len(vocab))
        ctrl_nl = [any(b < 0x20 and b != 0x0A for b in v) for v in vocab] + [False] * (vocab_size - len(vocab))
        self.control = torch.tensor(ctrl[:vocab_size])
        self.control_but_newline = torch.tensor(ctrl_nl[:vocab_size])
        self.utf8 = Utf8Masks(list(vocab), vocab_size)
        self._compile = lru_cache(maxsize=256)(self._compile_uncached)

    def _compile_uncached(self, kind: str, spec: str):
        xgr = self.xgr
        if kind == "json_object":  # any object (OpenAI's json_object mode), compact
            return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if kind == "json_schema":
            return self.compiler.compile_json_schema(spec, any_whitespace=False, strict_mode=True)
        return self.compiler.compile_grammar(xgr.Grammar.from_ebnf(spec) if kind == "ebnf" else spec)

    def compile(self, kind: str, spec: Any = "", param: str = "response_format"):
        text = spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True)
        try:
            return self._compile(kind, text)
        except Exception as e:  # xgrammar reports bad schemas with assorted exception types
            raise APIError(400, f"'{param}' cannot be compiled to a grammar: {str(e).splitlines()[0][:300]}",
                           param=param) from None

    def compile_grammar(self, grammar: Any):
        return self.compiler.compile_grammar(grammar)

    def processor(self, compiled: Any, allow_newline: bool = False, prefer: list[int] | None = None) -> GrammarProcessor:
        return GrammarProcessor(self, compiled, self.control_but_newline if allow_newline else self.control, prefer)


class GrammarProcessor:
    """Masks every token the grammar forbids after the tokens generated so far."""

    def __init__(self, backend: GrammarBackend, compiled: Any, banned: torch.Tensor, prefer: list[int] | None = None):
        """`prefer`: token ids (e.g. special markers) that, whenever the grammar allows one, are the only choice,
        so a marker is written as its single special token and not spelled out character by character."""
        self.backend, self.compiled, self.banned = backend, compiled, banned
        self.prefer = torch.tensor(sorted(prefer or []), dtype=torch.long)
        self._matchers: list[tuple[list[int], Any]] = []
        self._lock = threading.Lock()
        self._mask = backend.xgr.allocate_token_bitmask(1, backend.vocab_size)

    def _matcher_for(self, tokens: list[int]) -> Any:
        best = None
        for i, (seen, m) in enumerate(self._matchers):
            if len(seen) <= len(tokens) and tokens[:len(seen)] == seen and (best is None or len(seen) > len(self._matchers[best][0])):
                best = i
        if best is None:
            seen, m = [], self.backend.xgr.GrammarMatcher(self.compiled)
        else:
            seen, m = self._matchers.pop(best)
        for t in tokens[len(seen):]:
            if not m.accept_token(int(t)):
                raise RuntimeError("a token outside the grammar was sampled")
            seen = seen + [int(t)]
        self._matchers.append((seen, m))
        del self._matchers[:-64]
        return m

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        with self._lock:
            m = self._matcher_for(list(output_token_ids))
            if m.is_terminated():
                return logits
            m.fill_next_token_bitmask(self._mask)
            row = logits.float().reshape(1, -1).clone()
            width = min(row.shape[-1], self.backend.vocab_size)
            head = row[:, :width].contiguous()
            self.backend.xgr.apply_token_bitmask_inplace(head, self._mask[:, : (width + 31) // 32])
            head = head.masked_fill(self.banned[:width], float("-inf"))
            state = tail_state(self.backend.utf8.vocab, output_token_ids)  # xgrammar would let a surrogate through
            head = head.masked_fill(~self.backend.utf8.allowed(state)[:width], float("-inf"))
            if len(self.prefer):
                ok = self.prefer[torch.isfinite(head[0, self.prefer])]
                if len(ok):
                    only = torch.full_like(head, float("-inf"))
                    only[0, ok] = head[0, ok]
                    head = only
            row[:, :width] = head
            row[:, width:] = float("-inf")
            return row.reshape(logits.shape).to(logits.dtype)


def response_format_grammar(backend: GrammarBackend, fmt: Any):
    """The compiled grammar for an OpenAI `response_format`, or None for plain text."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return backend.compile("json_object")
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(400, "'response_format.json_schema.schema' is required for type json_schema",
                       param="response_format.json_schema")
    return backend.compile("json_schema", fmt.json_schema.schema_, param="response_format.json_schema")


def logit_bias_processor(bias: dict[str, float], vocab_size: int):
    """OpenAI `logit_bias` ({token id: bias in [-100, 100]}) as a logits processor."""
    try:
        items = {int(k): float(v) for k, v in bias.items()}
    except ValueError:
        raise APIError(400, "'logit_bias' keys must be token ids", param="logit_bias") from None
    for k, v in items.items():
        if not 0 <= k < vocab_size:
            raise APIError(400, f"'logit_bias' token id {k} is outside the vocabulary [0, {vocab_size})", param="logit_bias")
        if not -100 <= v <= 100:
            raise APIError(400, f"'logit_bias' value {v} for token {k} is outside [-100, 100]", param="logit_bias")
    ids = torch.tensor(list(items), dtype=torch.long)
    vals = torch.tensor(list(items.values()))

    def apply(output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        out = logits.clone()
        out[ids] += vals.to(out.dtype)
        return out

    return apply
