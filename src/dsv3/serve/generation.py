"""From an OpenAI request to engine calls and back: sampling parameters, admission, usage, logprobs.

Shared by the chat and completions routes. Admission is where a request either gets a 4xx (bad
parameters, prompt too long, a grammar with `ignore_eos`/`min_tokens`), a 503 (queue full) or is
handed to the engine -- all before the response starts, so a stream never opens only to fail. After
that, a request the engine stopped after an internal error answers 422 (`generation_failed`; the
engine and every other request carry on), and a stopped engine 503.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from functools import lru_cache
from typing import Any, AsyncIterator

from dsv3.engine.llm_engine import RequestFailedError
from dsv3.errors import DSV3Error
from dsv3.engine.outputs import EngineRequest, RequestOutput
from dsv3.engine.sampling import SamplingParams
from dsv3.serve.errors import APIError
from dsv3.serve.state import ServerState
from dsv3.io.tokenizer import LONG_TEXT

def sampling_params(req: Any, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    """The engine's parameters for an OpenAI body (logits processors are attached once the grammar is compiled)."""
    kw: dict[str, Any] = dict(
        n=req.n, max_tokens=max_tokens, min_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else req.temperature, top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, seed=req.seed, stop=req.stop,
        stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos, logprobs=logprobs)
    if getattr(req, "echo", False) and logprobs is not None:
        kw["prompt_logprobs"] = logprobs
    try:
        return SamplingParams(**kw)
    except DSV3Error as e:
        raise APIError(400, str(e)) from None


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


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def generate(st: ServerState, request: EngineRequest, rid: str, model: str | None = None,
                   info: dict | None = None) -> AsyncIterator[RequestOutput]:
    """Run one admitted request on the engine with latency metrics; `model` picks a LoRA adapter.

    `info["completion_tokens"]` follows every token generated (summed over a request's prompts), so what
    a client was sent is charged to its rate limit even if it disconnects before the end.
    """
    m, t0 = st.metrics, time.monotonic()
    last, produced = None, 0
    counts = info.setdefault("generated", {}) if info is not None else {}
    try:
        adapter = st.adapter_id(model)
        async for out in st.front.generate(request, None, rid, **({"adapter_id": adapter} if adapter else {})):
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


def token_text(tok: Any, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


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


def chat_logprobs(tok: Any, o: Any, top: int, start: int = 0) -> dict | None:
    """OpenAI chat `logprobs.content` for tokens start.. of one output (None if the engine gave none)."""
    lps = getattr(o, "logprobs", None)
    if lps is None:
        return None
    content = []
    for tid, d in zip(o.token_ids[start:], lps[start:]):
        s = token_text(tok, tid)
        others = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        content.append({"token": s, "logprob": float(d.get(tid, float("-inf"))), "bytes": token_bytes(tok, tid),
                        "top_logprobs": [{"token": token_text(tok, i), "logprob": float(v),
                                          "bytes": token_bytes(tok, i)} for i, v in others]})
    return {"content": content}


def completion_logprobs(tok: Any, ids: list[int], lps: list[dict | None], top: int, offset0: int = 0) -> dict:
    """Legacy completions `logprobs` (tokens, token_logprobs, top_logprobs, text_offset)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    pos = offset0
    for tid, d in zip(ids, lps):
        s = token_text(tok, tid)
        out["tokens"].append(s)
        out["text_offset"].append(pos)
        pos += len(s)
        if d is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(float(d.get(tid, float("-inf"))))
        out["top_logprobs"].append({token_text(tok, i): float(v) for i, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]})
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


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
