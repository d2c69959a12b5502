"""`POST /v1/completions`: text or token-id prompts (one or many), `echo`, prompt scoring, FIM `suffix`.

Prompt scoring is the legacy API's `echo` + `logprobs` with `max_tokens: 0`: the prompt's tokens and
their log-probabilities come back, nothing generated (one token is computed and dropped). vLLM's
`prompt_logprobs` reports the same numbers in vLLM's own shape. `text_offset` counts characters of
the choice's `text` as sent (the echoed prompt, then the completion), across stream chunks too.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from dsv3.serve.chat import grammar_spec, processors
from dsv3.serve.errors import APIError
from dsv3.serve.generation import (TextOffsets, admit, cache_lookup, completion_logprobs, encode, finish_reason, generate,
                                   keep_best, new_id, prompt_logprobs_body, sampling_params, stream_usage, truncate, usage)
from dsv3.serve.protocol import CompletionRequest
from dsv3.serve.state import ServerState
from dsv3.serve.streaming import DONE, KEEPALIVE, error_event, json_body, merge, sse, with_keepalive


async def _prompts(st: ServerState, req: CompletionRequest) -> list[list[int]]:
    """Every prompt as token ids (a string, a list of strings, a list of ids, a list of id lists)."""
    p, tok = req.prompt, st.tokenizer
    if isinstance(p, str):
        items: list[Any] = [p]
    elif p and all(isinstance(x, int) for x in p):
        items = [p]
    else:
        items = list(p)
    if not items:
        raise APIError(400, "'prompt' is empty", param="prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            if req.suffix is not None:
                fim = tok.fim_tokens
                if fim is None:
                    raise APIError(400, "'suffix' needs a model with fill-in-the-middle tokens; this one has none",
                                   param="suffix")
                bos = [tok.bos_token_id] if tok.bos_token_id is not None and req.add_special_tokens else []
                item = bos + [fim.prefix] + await encode(st, item, False) + [fim.suffix] + \
                    await encode(st, req.suffix, False, param="suffix") + [fim.middle]
            else:
                item = await encode(st, item, req.add_special_tokens, fit=not req.truncate_prompt_tokens)
        elif req.suffix is not None:
            raise APIError(400, "'suffix' works with text prompts only", param="suffix")
        out.append(truncate(st, req, list(item)))
    return out


def _scored_only(o: Any) -> Any:
    """`max_tokens: 0`: the one token computed to run the prompt is not part of the answer."""
    from dataclasses import replace

    return replace(o, text="", token_ids=[], logprobs=[] if o.logprobs is not None else None, cumulative_logprob=None,
                   finish_reason="length")


def _choice_logprobs(st: ServerState, req: CompletionRequest, prompt_ids: list[int], o: Any, prompt_lps: Any,
                     echo: str) -> dict | None:
    if req.logprobs is None:
        return None
    as_id, skip = req.return_tokens_as_token_ids, req.skip_special_tokens
    gen = getattr(o, "logprobs", None) or [None] * len(o.token_ids)
    limit = len(echo) + len(o.text)
    after = TextOffsets(st.tokenizer, prompt_ids, len(echo), skip).take(list(o.token_ids))
    if not req.echo:
        return completion_logprobs(st.tokenizer, o.token_ids, gen, req.logprobs, after, as_id, limit)
    plp = list(prompt_lps or [None] * len(prompt_ids))
    before = TextOffsets(st.tokenizer, None, 0, True).take(prompt_ids)
    return completion_logprobs(st.tokenizer, prompt_ids + list(o.token_ids), plp + list(gen), req.logprobs,
                               before + after, as_id, limit)


def register(app: FastAPI, st: ServerState) -> None:
    @app.post("/v1/completions", tags=["openai"])
    async def completions(req: CompletionRequest, request: Request):
        """Create a text completion (legacy OpenAI API; vLLM's extensions: see docs/serve.md for every field)."""
        st.require_ready()
        info = request.scope["dsv3"]
        model = info["model"] = st.check_model(req.model)
        req.check_supported()
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "'max_tokens' 0 returns nothing without 'echo' (prompt scoring: echo + logprobs)",
                           param="max_tokens")
        if req.max_tokens == 0 and req.stream:
            raise APIError(400, "'max_tokens' 0 (prompt scoring) cannot be streamed", param="stream")
        key, hit = cache_lookup(st, request.headers, info, "completions", model, req.model_dump(exclude_none=True, by_alias=True))
        if hit is not None:
            return Response(hit, media_type="application/json", headers={"x-dsv3-cache": "hit"})
        grammar = grammar_spec(st, req, False)  # cheap checks first
        prompts = await _prompts(st, req)
        if len(prompts) > st.config.max_queue:
            raise APIError(400, f"'prompt' holds {len(prompts)} prompts; the server queues at most "
                                f"{st.config.max_queue} at once (--max-queue): split the batch", param="prompt")
        params_list = [sampling_params(req, req.max_tokens, req.logprobs) for _ in prompts]
        requests = [admit(st, ids, params, req.max_tokens) for ids, params in zip(prompts, params_list)]
        st.reserve(info, len(prompts), param="prompt")
        for params in params_list:  # a grammar processor holds per-request state, so each prompt gets its own
            params.logits_processors = await processors(st, req, grammar)  # compiled once (cached), last: it costs most
        info["prompt_tokens"] = sum(len(p) for p in prompts)
        rid, created = new_id("cmpl"), int(time.time())
        head = {"id": req.request_id or rid, "object": "text_completion", "created": created, "model": model,
                "system_fingerprint": None}
        echo = [st.tokenizer.decode(p) if req.echo else "" for p in prompts]
        runs = [generate(st, request, f"{rid}-{k}", model, info, req.cache_salt) for k, request in enumerate(requests)]
        if req.stream:
            return StreamingResponse(_stream(st, req, info, runs, prompts, echo, head), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        finals: dict[int, Any] = {}
        async for k, out in merge(runs):
            finals[k] = out
        choices, n_out = [], 0
        for k, ids in enumerate(prompts):
            outs = keep_best(finals[k].outputs, req.n, req.best_of)
            if req.max_tokens == 0:
                outs = [_scored_only(o) for o in outs]
            n_out += sum(len(o.token_ids) for o in (outs if req.max_tokens == 0 else finals[k].outputs))
            plp = getattr(finals[k], "prompt_logprobs", None)
            for o in outs:
                choice = {"index": k * req.n + o.index, "text": echo[k] + o.text,
                          "logprobs": _choice_logprobs(st, req, ids, o, plp, echo[k]), "finish_reason": finish_reason(o)}
                if req.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = prompt_logprobs_body(st.tokenizer, ids, plp, req.return_tokens_as_token_ids)
                if req.return_token_ids:
                    choice["prompt_token_ids"], choice["token_ids"] = list(ids), list(o.token_ids)
                choices.append(choice)
        info["completion_tokens"] = n_out
        listed = n_out + (info["prompt_tokens"] if req.echo or req.prompt_logprobs is not None else 0)
        body = await json_body({**head, "choices": choices, "usage": usage(info["prompt_tokens"], n_out)},
                               listed * (1 + (req.logprobs or req.prompt_logprobs or 0)))
        if key is not None:
            st.cache.put(key, body)
        return Response(body, media_type="application/json", headers={"x-dsv3-cache": "miss"} if key else None)


async def _stream(st: ServerState, req: CompletionRequest, info: dict, runs: list, prompts: list, echo: list, head: dict):
    include_usage, continuous = stream_usage(req)
    as_id = req.return_tokens_as_token_ids
    sent: dict[int, tuple[int, int]] = {}
    offsets: dict[int, TextOffsets] = {}
    done: set[int] = set()
    last: dict[int, Any] = {}
    n_out = 0

    def chunk(choices: list, use: dict | None = None) -> bytes:
        body = {**head, "choices": choices}
        if include_usage:
            body["usage"] = use
        return sse(body)

    def produced() -> int:
        return sum(len(o.token_ids) for out in last.values() for o in out.outputs)

    try:
        async for item in with_keepalive(merge(runs), st.config.keepalive_s):
            if item is None:
                yield KEEPALIVE
                continue
            k, out = item
            last[k] = out
            choices = []
            for o in out.outputs:
                idx = k * req.n + o.index
                chars, toks = sent.get(idx, (0, 0))
                fr = finish_reason(o) if o.finish_reason and idx not in done else None
                if o.finish_reason:
                    done.add(idx)
                text = o.text[chars:]
                first = chars == 0 and toks == 0 and idx not in offsets
                if not text and fr is None and len(o.token_ids) == toks and not first:
                    continue
                lp_ids, lps, offs = list(o.token_ids[toks:]), None, None
                if req.logprobs is not None:
                    gen = getattr(o, "logprobs", None) or [None] * len(o.token_ids)
                    lps = list(gen[toks:])
                    if idx not in offsets:
                        offsets[idx] = TextOffsets(st.tokenizer, prompts[k], len(echo[k]), req.skip_special_tokens)
                    offs = offsets[idx].take(lp_ids)
                    if first and req.echo:  # the echoed prompt comes first, with its own offsets from 0
                        plp = list(out.prompt_logprobs or [None] * len(prompts[k]))
                        lp_ids, lps = list(prompts[k]) + lp_ids, plp + lps
                        offs = TextOffsets(st.tokenizer).take(list(prompts[k])) + offs
                elif first:
                    offsets[idx] = None
                if first:
                    text = echo[k] + text
                    offsets.setdefault(idx, None)
                lp = None if lps is None else completion_logprobs(st.tokenizer, lp_ids, lps, req.logprobs, offs, as_id,
                                                                  len(echo[k]) + len(o.text))
                c = {"index": idx, "text": text, "logprobs": lp, "finish_reason": fr}
                if req.return_token_ids:
                    c["token_ids"] = list(o.token_ids[toks:])
                    if first:
                        c["prompt_token_ids"] = list(prompts[k])
                if first and req.prompt_logprobs is not None:
                    c["prompt_logprobs"] = prompt_logprobs_body(st.tokenizer, prompts[k], out.prompt_logprobs, as_id)
                choices.append(c)
                sent[idx] = (len(o.text), len(o.token_ids))
            if choices:
                yield chunk(choices, usage(info["prompt_tokens"], produced()) if continuous else None)
        n_out = produced()
        info["completion_tokens"] = n_out
        if include_usage:
            yield chunk([], usage(info["prompt_tokens"], n_out))
    except Exception as e:
        yield error_event(e)
    yield DONE
