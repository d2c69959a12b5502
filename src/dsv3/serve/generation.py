"""From an OpenAI request to engine calls and back: sampling parameters, admission, usage, logprobs.

Shared by the chat and completions routes. Admission is where a request either gets a 4xx (bad
parameters, prompt too long, a grammar with `ignore_eos`/`min_tokens`), a 503 (queue full) or is
handed to the engine -- all before the response starts, so a stream never opens only to fail. After
that, a request the engine stopped after an internal error answers 422 (`generation_failed`; the
engine and every other request carry on), and a stopped engine 503.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import replace
from functools import lru_cache
from typing import Any, AsyncIterator

from dsv3.engine.llm_engine import RequestFailedError
from dsv3.errors import DSV3Error
from dsv3.engine.outputs import EngineRequest, RequestOutput
from dsv3.engine.sampling import SamplingParams
from dsv3.serve.errors import APIError
from dsv3.serve.state import ServerState
from dsv3.io.tokenizer import LONG_TEXT, IncrementalDetokenizer

def sampling_params(req: Any, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    """The engine's parameters for an OpenAI body (logits processors are attached once the grammar is compiled).

    `best_of` runs that many sequences (ranked afterwards by cumulative log-probability, which needs the sampled
    tokens' log-probs); `max_tokens` 0 (prompt scoring) runs one token that is never reported."""
    best_of = getattr(req, "best_of", None)
    n = req.n
    if best_of is not None:
        if best_of < n:
            raise APIError(400, f"'best_of' ({best_of}) must be at least 'n' ({n})", param="best_of")
        if req.stream and best_of > n:
            raise APIError(400, "'best_of' greater than 'n' cannot be streamed (the best are known only at the end)",
                           param="best_of")
        if best_of > n and logprobs is None:
            logprobs = 0
        n = best_of
    kw: dict[str, Any] = dict(
        n=n, max_tokens=max_tokens or (1 if max_tokens == 0 else None), min_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else req.temperature, top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, seed=req.seed, stop=req.stop,
        stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos, logprobs=logprobs,
        include_stop_str_in_output=req.include_stop_str_in_output, skip_special_tokens=req.skip_special_tokens)
    wanted = [k for k in (req.prompt_logprobs, logprobs if getattr(req, "echo", False) else None) if k is not None]
    if wanted:
        kw["prompt_logprobs"] = max(wanted)
    try:
        return SamplingParams(**kw)
    except DSV3Error as e:
        raise APIError(400, str(e)) from None


def keep_best(outputs: list[Any], n: int, best_of: int | None) -> list[Any]:
    """The `n` outputs of highest cumulative log-probability out of `best_of` (OpenAI's `best_of`), re-indexed."""
    if best_of is None or best_of <= n:
        return list(outputs)
    ranked = sorted(outputs, key=lambda o: -(o.cumulative_logprob if o.cumulative_logprob is not None else float("-inf")))
    return [replace(o, index=i) for i, o in enumerate(ranked[:n])]


def grammar_choice(req: Any, forced_tools: tuple[str, Any, str] | None = None) -> tuple[str, Any, str] | None:
    """(kind, spec, param) of the one grammar a request asks for: a forced tool call, `response_format`, vLLM's
    `guided_*` or `structured_outputs`; two at once are a 400 (a forced call wins over `response_format`, as in
    OpenAI: the reply is the call)."""
    from dsv3.serve.structured import response_format_spec

    asked: list[tuple[str, Any, str]] = []
    rf = response_format_spec(getattr(req, "response_format", None))
    if rf is not None and forced_tools is None:
        asked.append((*rf, "response_format"))
    if req.guided_json is not None:
        asked.append(("json_schema", _schema(req.guided_json, "guided_json"), "guided_json"))
    if req.guided_regex is not None:
        asked.append(("regex", req.guided_regex, "guided_regex"))
    if req.guided_choice is not None:
        asked.append(("choice", req.guided_choice, "guided_choice"))
    if req.guided_grammar is not None:
        asked.append(("ebnf", req.guided_grammar, "guided_grammar"))
    so = req.structured_outputs
    if so is not None:
        if so.structural_tag is not None:
            raise APIError(400, "'structured_outputs.structural_tag' is not supported by this server",
                           param="structured_outputs.structural_tag", code="unsupported_parameter")
        if so.whitespace_pattern is not None:
            raise APIError(400, "'structured_outputs.whitespace_pattern' is not supported: JSON is always generated "
                                "compact", param="structured_outputs.whitespace_pattern", code="unsupported_parameter")
        if so.json_ is not None:
            asked.append(("json_schema", _schema(so.json_, "structured_outputs.json"), "structured_outputs.json"))
        if so.regex is not None:
            asked.append(("regex", so.regex, "structured_outputs.regex"))
        if so.choice is not None:
            asked.append(("choice", so.choice, "structured_outputs.choice"))
        if so.grammar is not None:
            asked.append(("ebnf", so.grammar, "structured_outputs.grammar"))
        if so.json_object:
            asked.append(("json_object", "", "structured_outputs.json_object"))
    if forced_tools is not None:
        asked.insert(0, forced_tools)
    if len(asked) > 1:
        names = ", ".join(f"'{a[2]}'" for a in asked)
        raise APIError(400, f"{names} each ask for a grammar; give only one", param=asked[1][2])
    return asked[0] if asked else None


def _schema(value: Any, param: str) -> Any:
    """A JSON schema given as an object or as JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise APIError(400, f"'{param}' is not valid JSON", param=param) from None
    if not isinstance(value, (dict, bool)):
        raise APIError(400, f"'{param}' must be a JSON schema (an object)", param=param)
    return value


async def encode(st: ServerState, text: str, add_special_tokens: bool = True, param: str | None = "prompt",
                 fit: bool = True) -> list[int]:
    """Token ids of a request's text without stalling the event loop: a text that cannot fit the context
    (`fit`) is refused before tokenizing, and a long one is tokenized in a worker thread (the encoder then
    releases the GIL, so streams and the engine keep going)."""
    limit = st.engine.max_model_len
    if fit and len(text) > limit * st.tokenizer.max_token_chars:
        raise APIError(400, f"the prompt has {len(text)} characters, more than {limit} tokens can hold "
                            f"(max_model_len is {limit})", param=param)
    if len(text) > LONG_TEXT:
        return await asyncio.to_thread(st.tokenizer.encode, text, add_special_tokens)
    return st.tokenizer.encode(text, add_special_tokens)


def truncate(st: ServerState, req: Any, ids: list[int]) -> list[int]:
    """vLLM's `truncate_prompt_tokens`: keep the last k prompt tokens (k = -1: as many as the context holds,
    leaving room for one generated token); None or 0 keeps them all."""
    k = req.truncate_prompt_tokens
    if not k:
        return ids
    keep = st.engine.max_model_len - 1 if k == -1 else k
    return ids[-keep:] if len(ids) > keep else ids


def check_grammar_params(req: Any) -> None:
    """A grammar ends the output when it is complete (only a stop token may follow), so it cannot be combined
    with decoding that forbids stopping."""
    if req.ignore_eos:
        raise APIError(400, "'ignore_eos' cannot be combined with a grammar (response_format, a forced tool call): "
                            "the output ends when the grammar is complete", param="ignore_eos")
    if req.min_tokens:
        raise APIError(400, "'min_tokens' cannot be combined with a grammar (response_format, a forced tool call): "
                            "the output ends when the grammar is complete", param="min_tokens")


def admit(st: ServerState, prompt: list[int], params: SamplingParams, requested_max: int | None) -> EngineRequest:
    """Check a prompt's token ids and parameters against the engine (length, ids, n, stop ids), once: the
    `EngineRequest` returned is what `generate` queues."""
    try:
        request = st.engine.validate(prompt, params)
    except DSV3Error as e:
        msg = str(e)
        param = "prompt" if "prompt" in msg else "stop_token_ids" if "stop_token_ids" in msg else "n" if "n=" in msg else None
        raise APIError(400, msg, param=param) from None
    limit, n_prompt = st.engine.max_model_len, len(request.prompt_ids)
    if requested_max is not None and n_prompt + requested_max > limit:
        raise APIError(400, f"max_tokens={requested_max} plus the prompt's {n_prompt} tokens exceeds the "
                            f"model's context length of {limit} tokens", param="max_tokens")
    return request


def new_id(prefix: str, sep: str = "-") -> str:
    return f"{prefix}{sep}{uuid.uuid4().hex}"


async def generate(st: ServerState, request: EngineRequest, rid: str, model: str | None = None,
                   info: dict | None = None, cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
    """Run one admitted request on the engine with latency metrics; `model` picks a LoRA adapter.

    `info["completion_tokens"]` follows every token generated (summed over a request's prompts), so what
    a client was sent is charged to its rate limit even if it disconnects before the end.
    """
    m, t0 = st.metrics, time.monotonic()
    last, produced = None, 0
    counts = info.setdefault("generated", {}) if info is not None else {}
    try:
        adapter = st.adapter_id(model)
        kw: dict[str, Any] = {"adapter_id": adapter} if adapter else {}
        if cache_salt is not None:
            kw["cache_salt"] = cache_salt
        async for out in st.front.generate(request, None, rid, **kw):
            now = time.monotonic()
            n_tok = sum(len(o.token_ids) for o in out.outputs)
            if n_tok > produced:
                if m is not None:
                    (m.ttft if last is None else m.itl).observe(now - (t0 if last is None else last))
                last, produced = now, n_tok
                if info is not None:
                    counts[rid] = n_tok
                    info["completion_tokens"] = sum(counts.values())
            yield out
            if out.finished and m is not None:
                m.e2e.observe(time.monotonic() - t0)
                for o in out.outputs:
                    m.finished.labels(finished_reason=o.finish_reason or "abort").inc()
    except RequestFailedError as e:
        if m is not None:
            m.finished.labels(finished_reason="error").inc()
        if e.is_input:
            raise APIError(400, f"generation stopped: {e}", code="generation_constraint") from None
        raise APIError(422, f"this request failed inside the engine and was stopped ({e}); other requests are not "
                            "affected", code="generation_failed") from None
    except RuntimeError as e:
        raise APIError(503, f"the engine failed: {e}") from None


def finish_reason(o: Any) -> str | None:
    return None if o.finish_reason in (None, "abort") else o.finish_reason


def token_text(tok: Any, token_id: int, as_id: bool = False) -> str:
    """A token as logprobs show it: its text, or vLLM's `token_id:N` (`return_tokens_as_token_ids`)."""
    return f"token_id:{token_id}" if as_id else tok.decode([token_id], skip_special_tokens=False)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a byte-level BPE writes for each byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def token_bytes(tok: Any, token_id: int) -> list[int]:
    """OpenAI logprobs' `bytes`: what the token stands for — one byte of a multi-byte character is that
    byte, not the U+FFFD its text alone decodes to."""
    piece = tok.backend.id_to_token(token_id)
    dec = _byte_decoder()
    if piece and type(tok.backend.decoder).__name__ == "ByteLevel" and token_id not in tok._special_ids \
            and all(c in dec for c in piece):
        return [dec[c] for c in piece]
    return list(token_text(tok, token_id).encode())


def chat_logprobs(tok: Any, o: Any, top: int, start: int = 0, as_id: bool = False) -> dict | None:
    """OpenAI chat `logprobs.content` for tokens start.. of one output (None if the engine gave none)."""
    lps = getattr(o, "logprobs", None)
    if lps is None:
        return None
    content = []
    for tid, d in zip(o.token_ids[start:], lps[start:]):
        others = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        content.append({"token": token_text(tok, tid, as_id), "logprob": float(d.get(tid, float("-inf"))),
                        "bytes": token_bytes(tok, tid),
                        "top_logprobs": [{"token": token_text(tok, i, as_id), "logprob": float(v),
                                          "bytes": token_bytes(tok, i)} for i, v in others]})
    return {"content": content}


class TextOffsets:
    """Character offsets of tokens in the text a client is sent (`text_offset`): where each token's text begins,
    counted with the same decoding that produced the text (special tokens skipped, a character split over tokens
    placed at its first token, replacement characters of broken bytes credited to the tokens that held them),
    continuing across stream chunks."""

    def __init__(self, tok: Any, context: list[int] | None = None, start: int = 0, skip_special_tokens: bool = True):
        self.tok, self.skip = tok, skip_special_tokens
        self.detok = IncrementalDetokenizer(tok, context, skip_special_tokens=skip_special_tokens)
        self.pos = start

    def take(self, ids: list[int]) -> list[int]:
        out = []
        for t in ids:
            piece = self.detok.push(t)
            own = self.tok.decode([t], skip_special_tokens=self.skip) if piece else ""
            lead = len(piece) - len(own) if own and "\ufffd" not in own and piece.endswith(own) else 0
            out.append(self.pos + lead)
            self.pos += len(piece)
        return out


def completion_logprobs(tok: Any, ids: list[int], lps: list[dict | None], top: int, offsets: list[int] | None = None,
                        as_id: bool = False, limit: int | None = None) -> dict:
    """Legacy completions `logprobs` (tokens, token_logprobs, top_logprobs, text_offset); `offsets` from
    `TextOffsets`, clamped to `limit` (the text's length, which a stop string may have cut)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    if offsets is None:
        offsets = TextOffsets(tok).take(list(ids))
    for tid, d, pos in zip(ids, lps, offsets):
        out["tokens"].append(token_text(tok, tid, as_id))
        out["text_offset"].append(pos if limit is None else min(pos, limit))
        if d is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(float(d.get(tid, float("-inf"))))
        best: dict[str, float] = {}
        for i, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]:
            best.setdefault(token_text(tok, i, as_id), float(v))  # tokens of the same text: the likelier one
        out["top_logprobs"].append(best)
    return out


def prompt_logprobs_body(tok: Any, prompt_ids: list[int], plp: list | None, as_id: bool = False) -> list | None:
    """vLLM's `prompt_logprobs`: None for the first token, then {token id: {logprob, rank, decoded_token}} holding
    the prompt token and the top-k at each position."""
    if plp is None:
        return None
    out: list[dict | None] = [None]
    for tid, d in zip(prompt_ids[1:], list(plp)[1:]):
        if d is None:
            out.append(None)
            continue
        ranked = sorted(d.items(), key=lambda kv: -kv[1])
        entry = {}
        for r, (i, v) in enumerate(ranked, 1):
            entry[str(i)] = {"logprob": float(v), "rank": getattr(d, "rank", r) if i == tid else r,
                             "decoded_token": token_text(tok, i, as_id)}
        out.append(entry)
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def stream_usage(req: Any) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats) of a streamed request (vLLM: the latter only with the former)."""
    so = req.stream_options
    include = bool(so and so.include_usage)
    return include, include and bool(so.continuous_usage_stats)


def cache_lookup(st: ServerState, headers: Any, info: dict, route: str, model: str, body: dict) -> tuple[str | None, bytes | None]:
    """(key, stored body) for a deterministic request; (None, None) when the cache does not apply."""
    from dsv3.serve.cache import cache_key, is_deterministic

    cache = st.cache
    bypass = headers.get("x-dsv3-cache", "").lower() == "bypass" or "no-cache" in headers.get("cache-control", "").lower()
    if cache is None or bypass or not is_deterministic(body):
        return None, None
    key = cache_key(route, model, body, tenant=info["key_id"], fingerprint=cache.fingerprint)
    hit = cache.get(key)
    info["cache"] = "hit" if hit is not None else "miss"
    return key, hit
