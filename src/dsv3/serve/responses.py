"""`POST /v1/responses` (OpenAI's Responses API): text or message-list input, `instructions`, function tools,
structured text, streaming events, and conversations continued with `previous_response_id`.

A Responses request is turned into the equivalent chat request (instructions as a system message,
earlier function calls as assistant `tool_calls`, their outputs as tool messages) and runs through
the chat route's pieces: the chat template, the same grammar (a forced call, `text.format`), the
same admission and engine path. The reply comes back as output items: a `message` with
`output_text`, and one `function_call` per call.

With `store` (the default) the conversation -- earlier turns, this input, this output -- is kept
under the response's id so a later request can continue it with `previous_response_id`
(`instructions` are not carried over, as in OpenAI). The store is bounded in entries and bytes
(`ServeConfig.responses_max_entries` / `responses_max_bytes`, least recently used first out) and an
entry is visible only to the API key that created it: another key gets a 404, as for an id that
never existed.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from dsv3.serve.chat import _before_calls, _messages, grammar_spec, processors, tool_message
from dsv3.serve.errors import APIError
from dsv3.serve.generation import admit, encode, finish_reason, generate, new_id, sampling_params
from dsv3.serve.protocol import (ChatCompletionRequest, ResponseFunctionCall, ResponseMessage,
                                 ResponsesRequest)
from dsv3.serve.state import ServerState
from dsv3.serve.streaming import DONE, KEEPALIVE, error_event, json_body, with_keepalive
from dsv3.serve.tools import CALLS_BEGIN


class ResponseStore:
    """Stored responses and their conversations, bounded in count and bytes, each visible to its owner only."""

    def __init__(self, max_entries: int = 1000, max_bytes: int = 64 << 20):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[str, tuple[str | None, int, dict, list]] = OrderedDict()
        self.bytes = 0

    def put(self, rid: str, owner: str | None, response: dict, conversation: list[dict]) -> bool:
        size = len(json.dumps(response, ensure_ascii=False)) + len(json.dumps(conversation, ensure_ascii=False))
        if size > self.max_bytes or self.max_entries < 1:
            return False
        self._items[rid] = (owner, size, response, conversation)
        self.bytes += size
        while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
            _, (_, dropped, _, _) = self._items.popitem(last=False)
            self.bytes -= dropped
        return rid in self._items

    def get(self, rid: str, owner: str | None) -> tuple[dict, list] | None:
        entry = self._items.get(rid)
        if entry is None or entry[0] != owner:
            return None
        self._items.move_to_end(rid)
        return entry[2], entry[3]

    def delete(self, rid: str, owner: str | None) -> bool:
        entry = self._items.get(rid)
        if entry is None or entry[0] != owner:
            return False
        del self._items[rid]
        self.bytes -= entry[1]
        return True

    def __len__(self) -> int:
        return len(self._items)


def _input_items(req: ResponsesRequest) -> list[dict]:
    """The request's input as Responses items (plain dicts, as stored)."""
    if isinstance(req.input, str):
        return [{"type": "message", "role": "user", "content": req.input}]
    out = []
    for item in req.input:
        if isinstance(item, ResponseMessage):
            out.append({"type": "message", "role": item.role, "content": item.text()})
        elif isinstance(item, ResponseFunctionCall):
            out.append({"type": "function_call", "call_id": item.call_id, "name": item.name, "arguments": item.arguments})
        else:
            out.append({"type": "function_call_output", "call_id": item.call_id, "output": item.text()})
    return out


def _chat_messages(instructions: str | None, items: list[dict]) -> list[dict]:
    """Responses items -> chat messages (consecutive function calls become one assistant turn's tool_calls)."""
    msgs: list[dict] = [{"role": "system", "content": instructions}] if instructions else []
    for it in items:
        if it["type"] == "message":
            msgs.append({"role": it["role"], "content": it["content"]})
        elif it["type"] == "function_call":
            call = {"id": it["call_id"], "type": "function", "function": {"name": it["name"], "arguments": it["arguments"]}}
            if msgs and msgs[-1]["role"] == "assistant" and msgs[-1].get("tool_calls") is not None:
                msgs[-1]["tool_calls"].append(call)
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            msgs.append({"role": "tool", "content": it["output"], "tool_call_id": it["call_id"]})
    return msgs


def _as_chat(req: ResponsesRequest, messages: list[dict]) -> ChatCompletionRequest:
    body: dict[str, Any] = {"model": req.model, "messages": messages, "max_tokens": req.max_output_tokens,
                            "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed, "stream": req.stream,
                            "parallel_tool_calls": req.parallel_tool_calls}
    if req.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)} for t in req.tools]
    if req.tool_choice is not None:
        body["tool_choice"] = req.tool_choice if isinstance(req.tool_choice, str) else \
            {"type": "function", "function": {"name": req.tool_choice.name}}
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type != "text":
        body["response_format"] = {"type": fmt.type} if fmt.type == "json_object" else \
            {"type": "json_schema", "json_schema": {"name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict}}
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValueError as e:
        raise APIError(400, f"the request cannot be run as a conversation: {str(e).splitlines()[0]}") from None


def _usage(n_in: int, n_out: int) -> dict:
    return {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": n_out,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": n_in + n_out}


def _message_item(text: str, status: str) -> dict:
    return {"type": "message", "id": new_id("msg", "_"), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _call_items(calls: list[dict]) -> list[dict]:
    return [{"type": "function_call", "id": new_id("fc", "_"), "call_id": c["id"], "name": c["function"]["name"],
             "arguments": c["function"]["arguments"], "status": "completed"} for c in calls]


def register(app: FastAPI, st: ServerState) -> None:
    store = st.responses = ResponseStore(st.config.responses_max_entries, st.config.responses_max_bytes)

    @app.post("/v1/responses", tags=["openai"])
    async def create_response(req: ResponsesRequest, request: Request):
        """Create a model response (OpenAI's Responses API; see docs/serve.md for every field)."""
        st.require_ready()
        info = request.scope["dsv3"]
        model = info["model"] = st.check_model(req.model)
        req.check_supported()
        owner = info["key_id"]
        history: list[dict] = []
        if req.previous_response_id is not None:
            found = store.get(req.previous_response_id, owner)
            if found is None:
                raise APIError(404, f"there is no stored response {req.previous_response_id!r} (it may have been evicted "
                                    "from the bounded store, or stored with store: false)", param="previous_response_id",
                               code="previous_response_not_found")
            history = found[1]
        items = _input_items(req)
        chat = _as_chat(req, _chat_messages(req.instructions, history + items))
        with_tools = bool(chat.tools) and chat.tool_choice != "none"
        if chat.tool_choice not in (None, "none") and not chat.tools:
            raise APIError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        grammar = grammar_spec(st, chat, with_tools)
        text = st.tokenizer.apply_chat_template(_messages(chat, with_tools), add_generation_prompt=True)
        ids = await encode(st, text, add_special_tokens=False, param="input")
        params = sampling_params(chat, chat.max_tokens, None)
        engine_req = admit(st, ids, params, chat.max_tokens)
        st.reserve(info, 1)
        params.logits_processors = await processors(st, chat, grammar)
        info["prompt_tokens"] = len(engine_req.prompt_ids)
        rid, created = new_id("resp", "_"), int(time.time())
        base = {"id": rid, "object": "response", "created_at": created, "status": "in_progress", "error": None,
                "incomplete_details": None, "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
                "model": model, "output": [], "parallel_tool_calls": req.parallel_tool_calls is not False,
                "previous_response_id": req.previous_response_id, "reasoning": {"effort": None, "summary": None},
                "store": req.store, "temperature": req.temperature, "top_p": req.top_p,
                "text": {"format": req.text.format.model_dump(by_alias=True, exclude_none=True)
                         if req.text is not None and req.text.format is not None else {"type": "text"}},
                "tool_choice": req.tool_choice if isinstance(req.tool_choice, str) or req.tool_choice is None
                else req.tool_choice.model_dump(), "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
                "truncation": "disabled", "usage": None, "user": req.user, "metadata": req.metadata or {}}
        if base["tool_choice"] is None:
            base["tool_choice"] = "auto"

        def finish(o: Any, n_out: int) -> tuple[dict, list[dict]]:
            """The completed response object and the output items, from the engine's final output."""
            msg, _ = tool_message(st, o, chat.parallel_tool_calls) if with_tools else ({"content": o.text}, None)
            status = "incomplete" if finish_reason(o) == "length" else "completed"
            out = []
            if msg.get("content") or not msg.get("tool_calls"):
                out.append(_message_item(msg.get("content") or "", status))
            out += _call_items(msg.get("tool_calls") or [])
            resp = {**base, "status": status, "output": out, "usage": _usage(info["prompt_tokens"], n_out),
                    "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None}
            if req.store:
                stored = [{k: v for k, v in it.items() if k in ("type", "role", "content", "call_id", "name", "arguments")}
                          for it in out]
                for it in stored:
                    if it["type"] == "message":
                        it["content"] = "".join(p["text"] for p in it["content"])
                store.put(rid, owner, resp, history + items + stored)
            return resp, out

        if req.stream:
            return StreamingResponse(_stream(st, chat, info, engine_req, rid, model, with_tools, base, finish),
                                     media_type="text/event-stream", headers={"cache-control": "no-cache"})
        final = None
        async for out in generate(st, engine_req, rid, model, info):
            final = out
        o = final.outputs[0]
        info["completion_tokens"] = len(o.token_ids)
        resp, _ = finish(o, len(o.token_ids))
        return Response(await json_body(resp), media_type="application/json")

    @app.get("/v1/responses/{response_id}", tags=["openai"])
    async def get_response(response_id: str, request: Request):
        """A stored response (only to the API key that created it)."""
        found = store.get(response_id, request.scope["dsv3"]["key_id"])
        if found is None:
            raise APIError(404, f"there is no stored response {response_id!r}", param="response_id")
        return found[0]

    @app.delete("/v1/responses/{response_id}", tags=["openai"])
    async def delete_response(response_id: str, request: Request):
        """Delete a stored response (only the API key that created it can)."""
        if not store.delete(response_id, request.scope["dsv3"]["key_id"]):
            raise APIError(404, f"there is no stored response {response_id!r}", param="response_id")
        return {"id": response_id, "object": "response.deleted", "deleted": True}


def _event(kind: str, seq: list[int], **fields: Any) -> bytes:
    seq[0] += 1
    body = {"type": kind, "sequence_number": seq[0] - 1, **fields}
    return f"event: {kind}\ndata: ".encode() + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _stream(st: ServerState, chat: ChatCompletionRequest, info: dict, engine_req: Any, rid: str, model: str,
                  with_tools: bool, base: dict, finish: Any):
    """The Responses streaming events: created, in_progress, the message's text deltas as they come, function
    calls once complete, then completed (or incomplete) in the same write as `[DONE]`."""
    seq = [0]
    marker = st.tokenizer.token_to_id(CALLS_BEGIN)
    msg_id, sent, opened, last = new_id("msg", "_"), 0, False, None
    try:
        yield _event("response.created", seq, response=base)
        yield _event("response.in_progress", seq, response=base)
        async for out in with_keepalive(generate(st, engine_req, rid, model, info), st.config.keepalive_s):
            if out is None:
                yield KEEPALIVE
                continue
            last = out
            o = out.outputs[0]
            text = _before_calls(st, o, marker) if with_tools else o.text
            if len(text) > sent:
                if not opened:
                    opened = True
                    item = {"type": "message", "id": msg_id, "status": "in_progress", "role": "assistant", "content": []}
                    yield _event("response.output_item.added", seq, output_index=0, item=item)
                    yield _event("response.content_part.added", seq, item_id=msg_id, output_index=0, content_index=0,
                                 part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
                yield _event("response.output_text.delta", seq, item_id=msg_id, output_index=0, content_index=0,
                             delta=text[sent:], logprobs=[])
                sent = len(text)
        o = last.outputs[0]
        info["completion_tokens"] = len(o.token_ids)
        resp, items = finish(o, len(o.token_ids))
        index = 0
        for item in items:
            if item["type"] == "message":
                item["id"] = msg_id
                resp_text = item["content"][0]["text"]
                if not opened:
                    yield _event("response.output_item.added", seq, output_index=index,
                                 item={**item, "status": "in_progress", "content": []})
                    yield _event("response.content_part.added", seq, item_id=msg_id, output_index=index, content_index=0,
                                 part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
                if len(resp_text) > sent:
                    yield _event("response.output_text.delta", seq, item_id=msg_id, output_index=index, content_index=0,
                                 delta=resp_text[sent:], logprobs=[])
                yield _event("response.output_text.done", seq, item_id=msg_id, output_index=index, content_index=0,
                             text=resp_text, logprobs=[])
                yield _event("response.content_part.done", seq, item_id=msg_id, output_index=index, content_index=0,
                             part=item["content"][0])
            else:
                yield _event("response.output_item.added", seq, output_index=index,
                             item={**item, "arguments": "", "status": "in_progress"})
                yield _event("response.function_call_arguments.delta", seq, item_id=item["id"], output_index=index,
                             delta=item["arguments"])
                yield _event("response.function_call_arguments.done", seq, item_id=item["id"], output_index=index,
                             arguments=item["arguments"], name=item["name"])
            yield _event("response.output_item.done", seq, output_index=index, item=item)
            index += 1
        kind = "response.completed" if resp["status"] == "completed" else "response.incomplete"
        yield _event(kind, seq, response=resp) + DONE  # one write: the audit line is durable before the client has it
        return
    except Exception as e:
        yield error_event(e)
    yield DONE
