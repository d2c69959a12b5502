"""Structured output: a grammar (xgrammar) masks the logits at every step, so the output must parse.

`response_format` json_object / json_schema, vLLM's `guided_json` / `guided_regex` /
`guided_choice` / `guided_grammar` (EBNF) and `structured_outputs`, and forced tool calls compile to
an xgrammar grammar over the model's own vocabulary. A `GrammarProcessor` is a per-request logits processor
(`(output_token_ids, logits_row) -> logits_row`, the engine's hook); it keeps one matcher per
distinct output prefix, because the `n` sequences of a request share the processor but diverge.

Compiling is bounded, since a request chooses what is compiled: `GrammarLimits` refuses schemas
over a size, a nesting depth, a number of enum values or a regex repetition count before anything
is compiled (a 400 naming the limit), and what passes compiles in a child process
(`grammar_worker`) that is killed at the time budget. The server awaits `compile_async`, so the
event loop -- `/health`, running streams, keep-alives -- never waits for a compile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from dsv3.errors import DSV3Error
from dsv3.serve.errors import APIError
from dsv3.serve.utf8 import Utf8Masks, tail_state

log = logging.getLogger("dsv3.serve")


@dataclass
class GrammarLimits:
    """What a request may ask the grammar compiler to do (`dsv3 serve --grammar-*`)."""

    max_bytes: int = 64 << 10  # the schema / regex / grammar text, as compact JSON
    max_depth: int = 64  # JSON nesting (objects and arrays) of a schema
    max_enum: int = 2048  # enum values and consts in one schema, all together
    max_repeat: int = 1000  # regex counted repetition ({m,n}), nested counts multiplied
    timeout_s: float = 10.0  # wall-clock budget of one compile


_COUNT = re.compile(r"\{(\d*)(,?)(\d*)\}")


def max_repetition(pattern: str) -> int:
    """The largest product of nested counted repetitions in a regex: `^a{1,30000}$` -> 30000,
    `((a{1,20}){1,20}){1,5}` -> 2000. What xgrammar's regex compiler unrolls is about this large."""
    stack, last, i, n = [1], 0, 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            last, i = 1, i + 2
        elif ch == "[":
            j = i + 1 + (pattern[i + 1:i + 2] == "^")
            j += pattern[j:j + 1] == "]"
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            last, i = 1, j + 1
        elif ch == "(":
            stack.append(1)
            last, i = 0, i + 1
            continue
        elif ch == ")":
            last = stack.pop() if len(stack) > 1 else 1
            i += 1
        elif ch == "{" and (m := _COUNT.match(pattern, i)) and (m.group(1) or m.group(3)) and last:
            lo, hi = int(m.group(1) or 0), int(m.group(3) or 0)
            last *= max(lo, hi, 1)
            i = m.end()
        elif ch in "|^$":
            last, i = 0, i + 1
            continue
        elif ch in "*+?":
            i += 1
            continue
        else:
            last, i = 1, i + 1
        stack[-1] = max(stack[-1], last)
    return max(stack)


def check_text(text: str, limits: GrammarLimits, param: str, what: str) -> None:
    if len(text.encode("utf-8", "surrogatepass")) > limits.max_bytes:
        raise APIError(400, f"'{param}': the {what} is larger than the server's limit of {limits.max_bytes} bytes "
                            "(--grammar-max-bytes)", param=param, code="grammar_too_large")


def check_regex(pattern: str, limits: GrammarLimits, param: str) -> None:
    count = max_repetition(pattern)
    if count > limits.max_repeat:
        raise APIError(400, f"'{param}': the pattern {pattern[:60]!r} repeats up to {count} times, over the server's "
                            f"limit of {limits.max_repeat} (--grammar-max-repeat)", param=param, code="grammar_too_complex")


def check_schema(schema: Any, limits: GrammarLimits, param: str) -> str:
    """Refuse a JSON schema over the limits (400 naming the limit); return its canonical text."""
    enums, todo = 0, [(schema, 1)]
    while todo:  # iterative: a hostile schema may nest deeper than Python's recursion limit
        node, depth = todo.pop()
        if depth > limits.max_depth:
            raise APIError(400, f"'{param}': the schema nests deeper than the server's limit of {limits.max_depth} "
                                "levels (--grammar-max-depth)", param=param, code="grammar_too_complex")
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "enum" and isinstance(v, list):
                    enums += len(v)
                elif k == "const":
                    enums += 1
                elif k == "pattern" and isinstance(v, str):
                    check_regex(v, limits, param)
                elif k == "patternProperties" and isinstance(v, dict):
                    for key in v:
                        check_regex(key, limits, param)
                if isinstance(v, (dict, list)):
                    todo.append((v, depth + 1))
        elif isinstance(node, list):
            todo.extend((v, depth + 1) for v in node if isinstance(v, (dict, list)))
        if enums > limits.max_enum:
            raise APIError(400, f"'{param}': the schema lists more than the server's limit of {limits.max_enum} enum/const "
                                "values (--grammar-max-enum)", param=param, code="grammar_too_complex")
    text = schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    check_text(text, limits, param, "schema")
    return text


def check_spec(kind: str, spec: Any, limits: GrammarLimits, param: str = "response_format") -> str:
    """Apply the limits to a grammar spec (400 naming the limit) and return its text; cheap, so it runs before
    anything is built or compiled."""
    if kind == "json_object":
        return ""
    if kind == "json_schema":
        return check_schema(spec, limits, param)
    if kind == "tool_call":
        for _, schema, _ in spec["calls"]:
            check_schema(schema, limits, param)
        text = json.dumps(spec, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        check_text(text, limits, param, "tool schemas")
        return text
    if kind == "choice":
        if not isinstance(spec, list) or not spec or not all(isinstance(c, str) for c in spec):
            raise APIError(400, f"'{param}' must be a non-empty list of strings", param=param)
        if len(spec) > limits.max_enum:
            raise APIError(400, f"'{param}' lists {len(spec)} choices, over the server's limit of {limits.max_enum} "
                                "(--grammar-max-enum)", param=param, code="grammar_too_complex")
        text = json.dumps(spec, ensure_ascii=False)
        check_text(text, limits, param, "choices")
        return text
    if not isinstance(spec, str) or not spec:
        raise APIError(400, f"'{param}' must be a non-empty string", param=param)
    check_text(spec, limits, param, "regex" if kind == "regex" else "grammar")
    check_regex(spec, limits, param)  # counted repetition means the same in EBNF
    return spec


class GrammarDeadEnd(DSV3Error):
    """Mid-generation, the grammar allows no next token (a schema no output can finish): the request's fault."""


class GrammarTimeout(Exception):
    """A compile ran past its budget (its worker process was killed)."""


class GrammarBusy(Exception):
    """No compile worker became free within the budget."""


class _Worker:
    """One `python -m dsv3.serve.grammar_worker` child and our end of its socket pair."""

    def __init__(self, info_json: str):
        import socket
        import subprocess
        import sys
        from multiprocessing.connection import Connection

        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, "-m", "dsv3.serve.grammar_worker", str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send(info_json)
        if not self.conn.poll(120) or self.conn.recv()[0] != "ready":
            self.kill()
            raise RuntimeError("the grammar compiler process did not start")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5)
        self.conn.close()


class CompilerPool:
    """`workers` compiler processes, each used by one compile at a time, killed and replaced past the budget."""

    def __init__(self, info_json: str, workers: int = 1):
        self.info_json = info_json
        self._idle: queue.Queue = queue.Queue()
        for _ in range(workers):
            self._idle.put(None)  # started on first use
        self.killed = 0

    def start(self) -> None:
        """Start every worker now (so the first request does not pay for it)."""
        slots = []
        while True:
            try:
                slots.append(self._idle.get_nowait())
            except queue.Empty:
                break
        for w in slots:
            self._idle.put(w if w is not None else _Worker(self.info_json))

    def compile(self, kind: str, text: str, timeout_s: float) -> tuple[str, str]:
        """("ok", compiled grammar JSON) or ("error", message); raises GrammarTimeout / GrammarBusy."""
        try:
            w = self._idle.get(timeout=timeout_s)
        except queue.Empty:
            raise GrammarBusy() from None
        try:
            if w is None or not w.alive():
                w = _Worker(self.info_json)
            w.conn.send(("compile", kind, text))
            if not w.conn.poll(timeout_s):
                w.kill()
                w, self.killed = None, self.killed + 1
                raise GrammarTimeout()
            return w.conn.recv()
        except (EOFError, OSError, BrokenPipeError):  # the worker died (e.g. out of memory): start a new one next time
            if w is not None:
                w.kill()
            w = None
            return "error", "the grammar compiler process stopped while compiling it"
        finally:
            self._idle.put(w)

    def close(self) -> None:
        while True:
            try:
                w = self._idle.get_nowait()
            except queue.Empty:
                return
            if w is not None:
                w.kill()


class GrammarBackend:
    """xgrammar's tokenizer info and a compiler pool for one tokenizer, built once per server."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], limits: GrammarLimits | None = None,
                 workers: int = 1):
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast

        self.xgr = xgr
        self.limits = limits or GrammarLimits()
        if hasattr(tokenizer.backend, "token_bytes"):  # tiktoken (Kimi-K2, Moonlight): raw byte tokens, specials empty
            b = tokenizer.backend
            raw = [b"" if tokenizer.is_special(i) else b.token_bytes(i) for i in range(b.get_vocab_size())]
            self.info = xgr.TokenizerInfo(raw, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids))
        else:
            hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
            self.info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids))
        self.pool = CompilerPool(self.info.serialize_json(), workers)
        self.vocab_size = vocab_size
        self.stop_ids = torch.tensor(sorted(stop_token_ids), dtype=torch.long)
        # xgrammar's JSON strings admit raw control characters, which JSON forbids: mask those tokens out
        # (tool-call grammars keep bare "\n", which their fixed layout needs)
        vocab = self.info.decoded_vocab
        ctrl = [any(b < 0x20 for b in v) for v in vocab] + [False] * (vocab_size - len(vocab))
        ctrl_nl = [any(b < 0x20 and b != 0x0A for b in v) for v in vocab] + [False] * (vocab_size - len(vocab))
        self.control = torch.tensor(ctrl[:vocab_size])
        self.control_but_newline = torch.tensor(ctrl_nl[:vocab_size])
        self.utf8 = Utf8Masks(list(vocab), vocab_size)
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._cache_lock = threading.Lock()

    def check(self, kind: str, spec: Any = "", param: str = "response_format") -> str:
        return check_spec(kind, spec, self.limits, param)

    def _compile_text(self, kind: str, text: str, param: str) -> Any:
        with self._cache_lock:
            hit = self._cache.get((kind, text))
            if hit is not None:
                self._cache.move_to_end((kind, text))
                return hit
        try:
            status, payload = self.pool.compile(kind, text, self.limits.timeout_s)
        except GrammarTimeout:
            raise APIError(400, f"'{param}' took longer than the server's {self.limits.timeout_s:g} s budget to compile "
                                "(--grammar-timeout); simplify the schema", param=param, code="grammar_too_complex") from None
        except GrammarBusy:
            raise APIError(503, "the grammar compiler is busy; retry shortly", code="server_overloaded",
                           headers={"Retry-After": "1"}) from None
        if status != "ok":
            raise APIError(400, f"'{param}' cannot be compiled to a grammar: {payload}", param=param)
        compiled = self.xgr.CompiledGrammar.deserialize_json(payload, self.info)
        if not self._can_start(compiled):
            raise APIError(400, f"'{param}' can never be satisfied: no output is valid under it", param=param,
                           code="grammar_unsatisfiable")
        with self._cache_lock:
            self._cache[(kind, text)] = compiled
            while len(self._cache) > 256:
                self._cache.popitem(last=False)
        return compiled

    def _can_start(self, compiled: Any) -> bool:
        """Whether any token may come first (xgrammar compiles e.g. `{"not": {}}` to a grammar nothing satisfies)."""
        mask = self.xgr.allocate_token_bitmask(1, self.vocab_size)
        self.xgr.GrammarMatcher(compiled).fill_next_token_bitmask(mask)
        row = torch.zeros(1, self.vocab_size)
        self.xgr.apply_token_bitmask_inplace(row, mask)
        return bool(torch.isfinite(row).any())

    def compile(self, kind: str, spec: Any = "", param: str = "response_format") -> Any:
        """Check and compile (blocking; the server uses `compile_async`)."""
        return self._compile_text(kind, self.check(kind, spec, param), param)

    async def compile_async(self, kind: str, spec: Any = "", param: str = "response_format") -> Any:
        """Check on the loop (cheap), compile in a worker thread that waits on the compiler process."""
        text = self.check(kind, spec, param)
        return await asyncio.to_thread(self._compile_text, kind, text, param)

    def processor(self, compiled: Any, guide: Any = None) -> GrammarProcessor:
        """A per-request processor; `guide(output_ids, matcher, masked_row) -> row` refines the mask where the
        grammar alone is not enough (forced tool calls: `tools.ToolCallGuide`, which then places bare newlines)."""
        return GrammarProcessor(self, compiled, self.control_but_newline if guide is not None else self.control, guide)

    def close(self) -> None:
        self.pool.close()


class GrammarProcessor:
    """Masks every token the grammar forbids after the tokens generated so far."""

    def __init__(self, backend: GrammarBackend, compiled: Any, banned: torch.Tensor, guide: Any = None):
        self.backend, self.compiled, self.banned, self.guide = backend, compiled, banned, guide
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
            if m.is_terminated():  # the grammar is complete: only a stop token may follow
                only = torch.full_like(logits, float("-inf"))
                keep = self.backend.stop_ids[self.backend.stop_ids < logits.shape[-1]]
                only[keep] = logits[keep]
                return only
            m.fill_next_token_bitmask(self._mask)
            row = logits.float().reshape(1, -1).clone()
            width = min(row.shape[-1], self.backend.vocab_size)
            head = row[:, :width].contiguous()
            self.backend.xgr.apply_token_bitmask_inplace(head, self._mask[:, : (width + 31) // 32])
            head = head.masked_fill(self.banned[:width], float("-inf"))
            state = tail_state(self.backend.utf8.vocab, output_token_ids)  # xgrammar would let a surrogate through
            head = head.masked_fill(~self.backend.utf8.allowed(state)[:width], float("-inf"))
            if not bool(torch.isfinite(head).any()):
                raise GrammarDeadEnd(f"the grammar allows no token after {len(output_token_ids)} generated tokens: "
                                     "the schema cannot be completed from here")
            if self.guide is not None:
                head = self.guide(list(output_token_ids), m, head)
                if not bool(torch.isfinite(head).any()):
                    raise GrammarDeadEnd(f"no token fits the tool-call layout after {len(output_token_ids)} generated tokens")
            row[:, :width] = head
            row[:, width:] = float("-inf")
            return row.reshape(logits.shape).to(logits.dtype)


def response_format_spec(fmt: Any) -> tuple[str, Any] | None:
    """(kind, spec) of the grammar an OpenAI `response_format` asks for, or None for plain text."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return "json_object", ""
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(400, "'response_format.json_schema.schema' is required for type json_schema",
                       param="response_format.json_schema")
    return "json_schema", fmt.json_schema.schema_


def response_format_grammar(backend: GrammarBackend, fmt: Any):
    """The compiled grammar for an OpenAI `response_format`, or None for plain text (blocking)."""
    spec = response_format_spec(fmt)
    return None if spec is None else backend.compile(*spec, param="response_format")


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


def allowed_tokens_processor(ids: list[int], vocab_size: int):
    """vLLM's `allowed_token_ids`: every other token is masked."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise APIError(400, f"'allowed_token_ids' holds {bad}, outside the vocabulary [0, {vocab_size})",
                       param="allowed_token_ids")
    if not ids:
        raise APIError(400, "'allowed_token_ids' is empty: no token could be generated", param="allowed_token_ids")
    keep = torch.tensor(sorted(set(ids)), dtype=torch.long)

    def apply(output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(logits, float("-inf"))
        out[keep] = logits[keep]
        return out

    return apply
