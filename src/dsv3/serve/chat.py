"""`POST /v1/chat/completions`: chat template -> engine -> OpenAI chat objects, whole or streamed."""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from dsv3.engine.outputs import EngineRequest
from dsv3.serve.errors import APIError
from dsv3.serve.generation import (admit, cache_lookup, chat_logprobs, check_grammar_params, encode, finish_reason,
                                   generate, new_id, sampling_params, truncate, usage)
from dsv3.serve.protocol import ChatCompletionRequest, NamedToolChoice
from dsv3.serve.state import ServerState
from dsv3.serve.streaming import DONE, KEEPALIVE, error_event, json_body, sse, with_keepalive
from dsv3.serve.structured import check_spec, logit_bias_processor, response_format_spec
from dsv3.serve.tools import CALLS_BEGIN, forced_call_spec, marker_ids, parse_tool_calls, tools_system_prompt


def _messages(req: ChatCompletionRequest, with_tools: bool) -> list[dict[str, Any]]:
    out = []
    for m in req.messages:
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if d["content"] is None and not m.tool_calls:
            d["content"] = ""
        out.append(d)
    if with_tools:
        out.insert(0, {"role": "system", "content": tools_system_prompt(req.tools)})
    return out


def _grammar_spec(st: ServerState, req: ChatCompletionRequest, with_tools: bool) -> tuple[str, object, str] | None:
    """(kind, spec, param) of the grammar this request needs, checked against the limits (cheap: runs first)."""
    if with_tools and (req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice)):
        kind, spec, param = "tool_call", forced_call_spec(req.tools, req.tool_choice), "tools"
    elif (rf := response_format_spec(req.response_format)) is not None:
        kind, spec, param = *rf, "response_format"
    else:
        return None
    check_grammar_params(req)
    check_spec(kind, spec, st.config.grammar_limits, param)
    return kind, spec, param


async def _processors(st: ServerState, req: ChatCompletionRequest, grammar_spec: tuple | None) -> list:
    procs = []
    if req.logit_bias:
        procs.append(logit_bias_processor(req.logit_bias, st.engine.model.config.vocab_size))
    if grammar_spec is not None:
        kind, spec, param = grammar_spec
        grammar = await st.grammar()
        compiled = await grammar.compile_async(kind, spec, param=param)
        tools = kind == "tool_call"
        procs.append(grammar.processor(compiled, allow_newline=tools, prefer=marker_ids(st.tokenizer) if tools else None))
    return procs


def _tool_message(st: ServerState, o: Any) -> tuple[dict, str | None]:
    """The assistant message for one output of a tool-enabled request, and its finish reason."""
    ids = [t for t in o.token_ids if t not in st.engine.eos_ids]
    content, calls = parse_tool_calls(st.tokenizer.decode(ids, skip_special_tokens=False))
    if not calls:
        return {"role": "assistant", "content": o.text}, finish_reason(o)
    return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"


def _before_calls(st: ServerState, o: Any, marker: int | None) -> str:
    """The part of a tool-enabled output that is plain content: everything before the calls marker."""
    if marker is not None and marker in o.token_ids:
        return st.tokenizer.decode(o.token_ids[:o.token_ids.index(marker)])
    return o.text


def register(app: FastAPI, st: ServerState) -> None:
    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        """Create a chat completion (OpenAI semantics; `top_k`, `min_p`, `repetition_penalty` as extensions)."""
        st.require_ready()
        info = request.scope["dsv3"]
        model = info["model"] = st.check_model(req.model)
        with_tools = bool(req.tools) and req.tool_choice != "none"
        if req.tool_choice not in (None, "none") and not req.tools:
            raise APIError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        grammar_spec = _grammar_spec(st, req, with_tools)
        key, hit = cache_lookup(st, request.headers, info, "chat", model, req.model_dump(exclude_none=True, by_alias=True))
        if hit is not None:
            return Response(hit, media_type="application/json", headers={"x-dsv3-cache": "hit"})
        text = st.tokenizer.apply_chat_template(_messages(req, with_tools), add_generation_prompt=True)
        ids = await encode(st, text, add_special_tokens=False, param="messages", fit=not req.truncate_prompt_tokens)
        max_tokens = req.max_completion_tokens or req.max_tokens
        top = req.top_logprobs or 0
        params = sampling_params(req, max_tokens, top if req.logprobs else None)
        request = admit(st, truncate(st, req, ids), params, max_tokens)
        st.reserve(info, 1)
        params.logits_processors = await _processors(st, req, grammar_spec)  # compiling a grammar comes last: it costs most
        n_prompt = info["prompt_tokens"] = len(request.prompt_ids)
        rid, created = new_id("chatcmpl"), int(time.time())
        head = {"id": rid, "created": created, "model": model, "system_fingerprint": None}
        if req.stream:
            return StreamingResponse(_stream(st, req, info, request, head, with_tools),
                                     media_type="text/event-stream", headers={"cache-control": "no-cache"})
        final = None
        async for out in generate(st, request, rid, model, info):
            final = out
        choices = []
        for o in final.outputs:
            msg, fr = _tool_message(st, o) if with_tools else ({"role": "assistant", "content": o.text}, finish_reason(o))
            choices.append({"index": o.index, "message": msg,
                            "logprobs": chat_logprobs(st.tokenizer, o, top) if req.logprobs else None, "finish_reason": fr})
        n_out = sum(len(o.token_ids) for o in final.outputs)
        info["completion_tokens"] = n_out
        body = await json_body({**head, "object": "chat.completion", "choices": choices, "usage": usage(n_prompt, n_out)},
                               n_out * (1 + top) if req.logprobs else 0)
        if key is not None:
            st.cache.put(key, body)
        return Response(body, media_type="application/json", headers={"x-dsv3-cache": "miss"} if key else None)


async def _stream(st: ServerState, req: ChatCompletionRequest, info: dict, request: EngineRequest, head: dict,
                  with_tools: bool):
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    top = req.top_logprobs or 0

    def chunk(choices: list, use: dict | None = None) -> bytes:
        body = {**head, "object": "chat.completion.chunk", "choices": choices}
        if include_usage:
            body["usage"] = use
        return sse(body)

    marker = st.tokenizer.token_to_id(CALLS_BEGIN)
    n, n_prompt = request.params.n, len(request.prompt_ids)
    sent_chars, sent_toks, done = [0] * n, [0] * n, [False] * n
    last = None
    try:
        for i in range(n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
        async for out in with_keepalive(generate(st, request, head["id"], head["model"], info), st.config.keepalive_s):
            if out is None:
                yield KEEPALIVE
                continue
            last = out
            choices = []
            for o in out.outputs:
                i = o.index
                text = _before_calls(st, o, marker) if with_tools else o.text
                fr = finish_reason(o) if o.finish_reason and not done[i] and not with_tools else None
                delta, new_toks = text[sent_chars[i]:], len(o.token_ids) - sent_toks[i]
                if not delta and fr is None and not (req.logprobs and new_toks):
                    continue
                lp = chat_logprobs(st.tokenizer, o, top, sent_toks[i]) if req.logprobs else None
                choices.append({"index": i, "delta": {"content": delta} if delta else {}, "logprobs": lp, "finish_reason": fr})
                sent_chars[i], sent_toks[i], done[i] = len(text), len(o.token_ids), done[i] or fr is not None
            if choices:
                yield chunk(choices)
        if with_tools and last is not None:  # calls are parsed once complete, then sent as one delta each
            for o in last.outputs:
                msg, fr = _tool_message(st, o)
                rest = (msg.get("content") or "")[sent_chars[o.index]:]
                delta = {"content": rest} if rest else {}
                if "tool_calls" in msg:
                    delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(msg["tool_calls"])]
                yield chunk([{"index": o.index, "delta": delta, "logprobs": None, "finish_reason": fr}])
        n_out = sum(len(o.token_ids) for o in last.outputs) if last else 0
        info["completion_tokens"] = n_out
        if include_usage:
            yield chunk([], usage(n_prompt, n_out))
    except Exception as e:
        yield error_event(e)
    yield DONE
