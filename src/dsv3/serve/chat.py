"""`POST /v1/chat/completions`: chat template -> engine -> OpenAI chat objects, whole or streamed."""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from dsv3.engine.outputs import EngineRequest
from dsv3.serve.errors import APIError
from dsv3.serve.generation import (admit, cache_lookup, chat_logprobs, check_grammar_params, encode, finish_reason,
                                   generate, grammar_choice, keep_best, new_id, prompt_logprobs_body, sampling_params,
                                   stream_usage, truncate, usage)
from dsv3.serve.protocol import ChatCompletionRequest, NamedToolChoice
from dsv3.serve.state import ServerState
from dsv3.serve.streaming import DONE, KEEPALIVE, error_event, json_body, sse, with_keepalive
from dsv3.serve.structured import allowed_tokens_processor, check_spec, logit_bias_processor
from dsv3.serve import tool_formats
from dsv3.serve.tools import (CALLS_BEGIN, ToolCallGuide, parse_tool_call_ids, tools_system_prompt)


def _plain_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    out = []
    for m in req.messages:
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if getattr(m, "reasoning_content", None) is not None:
            d["reasoning_content"] = m.reasoning_content
        if d["content"] is None and not m.tool_calls:
            d["content"] = ""
        out.append(d)
    return out


def _messages(req: ChatCompletionRequest, with_tools: bool) -> list[dict[str, Any]]:
    """The messages with DeepSeek-V3's tool description in front (the Responses API's path)."""
    out = _plain_messages(req)
    if with_tools:
        out.insert(0, {"role": "system", "content": tools_system_prompt(req.tools)})
    return out


def render_prompt(st: ServerState, req: ChatCompletionRequest, with_tools: bool) -> tuple[str, bool]:
    """The prompt text of a chat request in the model's own format, and whether the reply opens with reasoning."""
    fmt = st.tokenizer.chat_format
    kwargs, thinking = tool_formats.template_kwargs(fmt, req)
    msgs, tools = tool_formats.prompt_messages(fmt, _plain_messages(req), req.tools if with_tools else None)
    text = st.tokenizer.apply_chat_template(msgs, add_generation_prompt=req.add_generation_prompt, tools=tools, **kwargs)
    return text, thinking


def _forced(req: Any, with_tools: bool) -> bool:
    return with_tools and (req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice))


def grammar_spec(st: ServerState, req: Any, with_tools: bool, native: bool = False) -> tuple[str, object, str] | None:
    """(kind, spec, param) of the grammar this request needs, checked against the limits (cheap: runs first).
    Forced calls take the model's own layout when `native` (chat completions), else DeepSeek-V3's (the Responses
    API, which describes tools in V3's format)."""
    forced = None
    if _forced(req, with_tools):
        fmt = st.tokenizer.chat_format if native else tool_formats.V3_FORMAT
        forced = ("tool_call", tool_formats.forced_spec(fmt, req.tools, req.tool_choice, req.parallel_tool_calls), "tools")
    choice = grammar_choice(req, forced)
    if choice is None:
        return None
    check_grammar_params(req)
    check_spec(choice[0], choice[1], st.config.grammar_limits, choice[2])
    return choice


async def processors(st: ServerState, req: Any, grammar: tuple | None) -> list:
    """The logits processors of a request: logit_bias, allowed_token_ids, then its compiled grammar."""
    procs = []
    vocab = st.engine.model.config.vocab_size
    if req.logit_bias:
        procs.append(logit_bias_processor(req.logit_bias, vocab))
    if req.allowed_token_ids is not None:
        procs.append(allowed_tokens_processor(req.allowed_token_ids, vocab))
    if grammar is not None:
        kind, spec, param = grammar
        backend = await st.grammar()
        compiled = await backend.compile_async(kind, spec, param=param)
        guide = ToolCallGuide(st.tokenizer, backend.control, **tool_formats.guide_layout(spec)) \
            if kind == "tool_call" else None
        procs.append(backend.processor(compiled, guide))
    return procs


def tool_message(st: ServerState, o: Any, parallel: bool | None = None) -> tuple[dict, str | None]:
    """The assistant message for one output of a tool-enabled request, and its finish reason
    (`parallel_tool_calls: false` keeps the first call)."""
    ids = [t for t in o.token_ids if t not in st.engine.eos_ids]
    content, calls = parse_tool_call_ids(st.tokenizer, ids)
    if not calls:
        return {"role": "assistant", "content": o.text}, finish_reason(o)
    if parallel is False:
        calls = calls[:1]
    return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"


def own_format(st: ServerState, with_tools: bool, thinking: bool) -> bool:
    """Whether replies are split by `tool_formats` (thinking, or calls in a format other than V3's token-id path)."""
    return thinking or (with_tools and st.tokenizer.chat_format.tool_format != tool_formats.V3)


def raw_text(st: ServerState, o: Any) -> str:
    """An output's text with special tokens kept (markers are text to the parsers) and EOS left out."""
    return st.tokenizer.decode([t for t in o.token_ids if t not in st.engine.eos_ids], skip_special_tokens=False)


def format_message(st: ServerState, o: Any, with_tools: bool, thinking: bool,
                   parallel: bool | None = None) -> tuple[dict, str | None]:
    """The assistant message of one output in the model's own format: reasoning_content, content, tool_calls."""
    fmt = st.tokenizer.chat_format
    text = raw_text(st, o)
    reasoning, content = tool_formats.split_reasoning(text) if thinking else (None, text)
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if thinking:
        msg["reasoning_content"] = reasoning
    if with_tools and content:
        body, calls = tool_formats.parse_calls(fmt, content)
        if calls:
            msg["content"] = body
            msg["tool_calls"] = calls[:1] if parallel is False else calls
            return msg, "tool_calls"
    return msg, finish_reason(o)


def _before_calls(st: ServerState, o: Any, marker: int | None) -> str:
    """The part of a tool-enabled output that is plain content: everything before the calls marker."""
    if marker is not None and marker in o.token_ids:
        return st.tokenizer.decode(o.token_ids[:o.token_ids.index(marker)])
    return o.text


def register(app: FastAPI, st: ServerState) -> None:
    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        """Create a chat completion (OpenAI semantics; vLLM's extensions: see docs/serve.md for every field)."""
        st.require_ready()
        info = request.scope["dsv3"]
        model = info["model"] = st.check_model(req.model)
        req.check_supported()
        with_tools = bool(req.tools) and req.tool_choice != "none"
        if req.tool_choice not in (None, "none") and not req.tools:
            raise APIError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        grammar = grammar_spec(st, req, with_tools, native=True)
        key, hit = cache_lookup(st, request.headers, info, "chat", model, req.model_dump(exclude_none=True, by_alias=True))
        if hit is not None:
            return Response(hit, media_type="application/json", headers={"x-dsv3-cache": "hit"})
        text, thinking = render_prompt(st, req, with_tools)
        if thinking and _forced(req, with_tools):
            raise APIError(400, "forced tool calls ('tool_choice' \"required\" or a named function) need thinking off: "
                                "the calls must open the reply", param="tool_choice")
        ids = await encode(st, text, add_special_tokens=req.add_special_tokens, param="messages",
                           fit=not req.truncate_prompt_tokens)
        max_tokens = req.max_completion_tokens or req.max_tokens
        top = req.top_logprobs or 0
        params = sampling_params(req, max_tokens, top if req.logprobs else None)
        request = admit(st, truncate(st, req, ids), params, max_tokens)
        st.reserve(info, 1)
        params.logits_processors = await processors(st, req, grammar)  # compiling a grammar comes last: it costs most
        n_prompt = info["prompt_tokens"] = len(request.prompt_ids)
        rid, created = new_id("chatcmpl"), int(time.time())
        head = {"id": req.request_id or rid, "created": created, "model": model, "system_fingerprint": None}
        if req.stream:
            return StreamingResponse(_stream(st, req, info, request, head, rid, with_tools, thinking),
                                     media_type="text/event-stream", headers={"cache-control": "no-cache"})
        final = None
        async for out in generate(st, request, rid, model, info, req.cache_salt):
            final = out
        as_id = req.return_tokens_as_token_ids
        choices = []
        for o in keep_best(final.outputs, req.n, req.best_of):
            if own_format(st, with_tools, thinking):
                msg, fr = format_message(st, o, with_tools, thinking, req.parallel_tool_calls)
            else:
                msg, fr = tool_message(st, o, req.parallel_tool_calls) if with_tools else \
                    ({"role": "assistant", "content": o.text}, finish_reason(o))
            choice = {"index": o.index, "message": msg,
                      "logprobs": chat_logprobs(st.tokenizer, o, top, as_id=as_id) if req.logprobs else None,
                      "finish_reason": fr}
            if req.return_token_ids:
                choice["token_ids"] = list(o.token_ids)
            choices.append(choice)
        n_out = sum(len(o.token_ids) for o in final.outputs)
        info["completion_tokens"] = n_out
        body = {**head, "object": "chat.completion", "choices": choices, "usage": usage(n_prompt, n_out)}
        if req.prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs_body(st.tokenizer, list(request.prompt_ids), final.prompt_logprobs, as_id)
        if req.return_token_ids:
            body["prompt_token_ids"] = list(request.prompt_ids)
        size = n_out * (1 + top) if req.logprobs else 0
        size += n_prompt * (1 + req.prompt_logprobs) if req.prompt_logprobs is not None else 0
        body = await json_body(body, size)
        if key is not None:
            st.cache.put(key, body)
        return Response(body, media_type="application/json", headers={"x-dsv3-cache": "miss"} if key else None)


async def _stream(st: ServerState, req: ChatCompletionRequest, info: dict, request: EngineRequest, head: dict, rid: str,
                  with_tools: bool, thinking: bool = False):
    include_usage, continuous = stream_usage(req)
    top = req.top_logprobs or 0
    as_id = req.return_tokens_as_token_ids
    n, n_prompt = request.params.n, len(request.prompt_ids)

    def chunk(choices: list, use: dict | None = None, extra: dict | None = None) -> bytes:
        body = {**head, "object": "chat.completion.chunk", "choices": choices, **(extra or {})}
        if include_usage:
            body["usage"] = use
        return sse(body)

    marker = st.tokenizer.token_to_id(CALLS_BEGIN)
    own = own_format(st, with_tools, thinking)
    splitter = tool_formats.StreamSplitter(st.tokenizer.chat_format, thinking, with_tools)
    sent_chars, sent_toks, done, sent_reasoning = [0] * n, [0] * n, [False] * n, [0] * n
    last, prompt_sent = None, req.prompt_logprobs is None
    try:
        first = {"prompt_token_ids": list(request.prompt_ids)} if req.return_token_ids else None
        for i in range(n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],
                        usage(n_prompt, 0) if continuous else None, first if i == 0 else None)
        async for out in with_keepalive(generate(st, request, rid, head["model"], info, req.cache_salt), st.config.keepalive_s):
            if out is None:
                yield KEEPALIVE
                continue
            last = out
            choices = []
            for o in out.outputs:
                i = o.index
                if own:
                    reasoning, text = splitter.visible(raw_text(st, o), o.finish_reason is not None)
                else:
                    reasoning, text = "", _before_calls(st, o, marker) if with_tools else o.text
                fr = finish_reason(o) if o.finish_reason and not done[i] and not with_tools else None
                delta, new_toks = text[sent_chars[i]:], len(o.token_ids) - sent_toks[i]
                rdelta = reasoning[sent_reasoning[i]:]
                if not delta and not rdelta and fr is None and not ((req.logprobs or req.return_token_ids) and new_toks):
                    continue
                lp = chat_logprobs(st.tokenizer, o, top, sent_toks[i], as_id) if req.logprobs else None
                d = {"reasoning_content": rdelta} if rdelta else {}
                if delta:
                    d["content"] = delta
                sent_reasoning[i] = len(reasoning)
                c = {"index": i, "delta": d, "logprobs": lp, "finish_reason": fr}
                if req.return_token_ids:
                    c["token_ids"] = list(o.token_ids[sent_toks[i]:])
                choices.append(c)
                sent_chars[i], sent_toks[i], done[i] = len(text), len(o.token_ids), done[i] or fr is not None
            extra = None
            if not prompt_sent and out.prompt_logprobs is not None:
                extra = {"prompt_logprobs": prompt_logprobs_body(st.tokenizer, list(request.prompt_ids), out.prompt_logprobs, as_id)}
                prompt_sent = True
            if choices or extra:
                yield chunk(choices, usage(n_prompt, sum(len(o.token_ids) for o in out.outputs)) if continuous else None, extra)
        if with_tools and last is not None:  # calls are parsed once complete, then sent as one delta each
            for o in last.outputs:
                if own:
                    msg, fr = format_message(st, o, with_tools, thinking, req.parallel_tool_calls)
                else:
                    msg, fr = tool_message(st, o, req.parallel_tool_calls)
                rest = (msg.get("content") or "")[sent_chars[o.index]:]
                delta = {"content": rest} if rest else {}
                more = (msg.get("reasoning_content") or "")[sent_reasoning[o.index]:]
                if more:
                    delta["reasoning_content"] = more
                if "tool_calls" in msg:
                    delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(msg["tool_calls"])]
                n_now = sum(len(x.token_ids) for x in last.outputs)
                yield chunk([{"index": o.index, "delta": delta, "logprobs": None, "finish_reason": fr}],
                            usage(n_prompt, n_now) if continuous else None)
        n_out = sum(len(o.token_ids) for o in last.outputs) if last else 0
        info["completion_tokens"] = n_out
        if include_usage:
            yield chunk([], usage(n_prompt, n_out))
    except Exception as e:
        yield error_event(e)
    yield DONE
