"""`POST /v1/completions`: text or token-id prompts (one or many), `echo`, prompt logprobs, FIM `suffix`."""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from dsv3.serve.errors import APIError
from dsv3.serve.generation import (admit, cache_lookup, check_grammar_params, completion_logprobs, encode,
                                   finish_reason, generate, new_id, sampling_params, truncate, usage)
from dsv3.serve.protocol import CompletionRequest
from dsv3.serve.state import ServerState
from dsv3.serve.streaming import DONE, KEEPALIVE, error_event, json_body, merge, sse, with_keepalive
from dsv3.serve.structured import check_spec, logit_bias_processor, response_format_spec


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
                bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
                item = bos + [fim.prefix] + await encode(st, item, False) + [fim.suffix] + \
                    await encode(st, req.suffix, False, param="suffix") + [fim.middle]
            else:
                item = await encode(st, item, fit=not req.truncate_prompt_tokens)
        elif req.suffix is not None:
            raise APIError(400, "'suffix' works with text prompts only", param="suffix")
        out.append(truncate(st, req, list(item)))
    return out


def _logprobs(st: ServerState, req: CompletionRequest, prompt_ids: list[int], o: Any, prompt_lps: Any) -> dict | None:
    if req.logprobs is None:
        return None
    gen = getattr(o, "logprobs", None) or [None] * len(o.token_ids)
    if not req.echo:
        return completion_logprobs(st.tokenizer, o.token_ids, gen, req.logprobs)
    plp = prompt_lps or [None] * len(prompt_ids)
    return completion_logprobs(st.tokenizer, prompt_ids + o.token_ids, list(plp) + list(gen), req.logprobs)


def register(app: FastAPI, st: ServerState) -> None:
    @app.post("/v1/completions", tags=["openai"])
    async def completions(req: CompletionRequest, request: Request):
        """Create a text completion (legacy OpenAI API)."""
        st.require_ready()
        info = request.scope["dsv3"]
        model = info["model"] = st.check_model(req.model)
        key, hit = cache_lookup(st, request.headers, info, "completions", model, req.model_dump(exclude_none=True, by_alias=True))
        if hit is not None:
            return Response(hit, media_type="application/json", headers={"x-dsv3-cache": "hit"})
        if (spec := response_format_spec(req.response_format)) is not None:  # cheap checks first
            check_grammar_params(req)
            check_spec(*spec, st.config.grammar_limits, "response_format")
        procs = []
        if req.logit_bias:
            procs.append(logit_bias_processor(req.logit_bias, st.engine.model.config.vocab_size))
        prompts = await _prompts(st, req)
        if len(prompts) > st.config.max_queue:
            raise APIError(400, f"'prompt' holds {len(prompts)} prompts; the server queues at most "
                                f"{st.config.max_queue} at once (--max-queue): split the batch", param="prompt")
        params_list = [sampling_params(req, req.max_tokens, req.logprobs) for _ in prompts]
        requests = [admit(st, ids, params, req.max_tokens) for ids, params in zip(prompts, params_list)]
        st.reserve(info, len(prompts), param="prompt")
        backend = compiled = None
        if spec is not None:  # compiling comes last: it costs most
            backend = await st.grammar()
            compiled = await backend.compile_async(*spec, param="response_format")
        for params in params_list:  # a grammar processor holds per-request state, so each prompt gets its own
            params.logits_processors = procs + ([backend.processor(compiled)] if compiled is not None else [])
        info["prompt_tokens"] = sum(len(p) for p in prompts)
        rid, created = new_id("cmpl"), int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": model, "system_fingerprint": None}
        echo = [st.tokenizer.decode(p) if req.echo else "" for p in prompts]
        runs = [generate(st, request, f"{rid}-{k}", model, info) for k, request in enumerate(requests)]
        if req.stream:
            return StreamingResponse(_stream(st, req, info, runs, prompts, echo, head), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        finals: dict[int, Any] = {}
        async for k, out in merge(runs):
            finals[k] = out
        choices, n_out = [], 0
        for k, ids in enumerate(prompts):
            for o in finals[k].outputs:
                n_out += len(o.token_ids)
                lp = _logprobs(st, req, ids, o, getattr(finals[k], "prompt_logprobs", None))
                choices.append({"index": k * req.n + o.index, "text": echo[k] + o.text, "logprobs": lp,
                                "finish_reason": finish_reason(o)})
        info["completion_tokens"] = n_out
        listed = n_out + (info["prompt_tokens"] if req.echo else 0)
        body = await json_body({**head, "choices": choices, "usage": usage(info["prompt_tokens"], n_out)},
                               listed * (1 + (req.logprobs or 0)) if req.logprobs is not None else 0)
        if key is not None:
            st.cache.put(key, body)
        return Response(body, media_type="application/json", headers={"x-dsv3-cache": "miss"} if key else None)


async def _stream(st: ServerState, req: CompletionRequest, info: dict, runs: list, prompts: list, echo: list, head: dict):
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    sent: dict[int, tuple[int, int]] = {}
    done: set[int] = set()
    last: dict[int, Any] = {}
    n_out = 0

    def chunk(choices: list, use: dict | None = None) -> bytes:
        body = {**head, "choices": choices}
        if include_usage:
            body["usage"] = use
        return sse(body)

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
                if not text and fr is None and len(o.token_ids) == toks:
                    continue
                if chars == 0 and toks == 0 and echo[k]:
                    text = echo[k] + text
                lp = None
                if req.logprobs is not None:
                    gen = getattr(o, "logprobs", None) or [None] * len(o.token_ids)
                    lp = completion_logprobs(st.tokenizer, o.token_ids[toks:], gen[toks:], req.logprobs)
                choices.append({"index": idx, "text": text, "logprobs": lp, "finish_reason": fr})
                sent[idx] = (len(o.text), len(o.token_ids))
            if choices:
                yield chunk(choices)
        n_out = sum(len(o.token_ids) for out in last.values() for o in out.outputs)
        info["completion_tokens"] = n_out
        if include_usage:
            yield chunk([], usage(info["prompt_tokens"], n_out))
    except Exception as e:
        yield error_event(e)
    yield DONE
