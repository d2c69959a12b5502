"""Forced tool calls (issue 20, item 1): string, integer and nested-object arguments parse and validate, with the
grammar alone, through the server with the openai SDK, LangChain's bind_tools / with_structured_output and
LlamaIndex's structured_predict; markers never land inside arguments; parallel_tool_calls is honoured."""

from __future__ import annotations

import json

import jsonschema_rs
import openai
import pytest
import torch

from dsv3.io.tokenizer import Tokenizer
from dsv3.serve.protocol import Tool
from dsv3.serve.structured import GrammarBackend
from dsv3.serve.tools import (CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP, ToolCallGuide, forced_call_grammar,
                              marker_ids, parse_tool_call_ids)
from serve_harness import serve, tiny_model_dir

# a string long enough to hold any marker's text (the bug: the marker token was forced wherever its text fit)
NOTE = {"type": "function", "function": {"name": "save_note", "description": "store a note", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["title", "body"],
    "properties": {"title": {"type": "string", "minLength": 1, "maxLength": 40}, "body": {"type": "string", "maxLength": 60}}}}}
COUNT = {"type": "function", "function": {"name": "set_count", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["n"],
    "properties": {"n": {"type": "integer", "minimum": -50, "maximum": 5000}}}}}
NESTED = {"type": "function", "function": {"name": "book", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["guest", "nights"],
    "properties": {"nights": {"type": "integer", "minimum": 1, "maximum": 30},
                   "guest": {"type": "object", "additionalProperties": False, "required": ["name", "tags"],
                             "properties": {"name": {"type": "string", "maxLength": 30},
                                            "tags": {"type": "array", "maxItems": 3,
                                                     "items": {"type": "string", "maxLength": 20}}}}}}}}
TOOLS = [NOTE, COUNT, NESTED]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def backend(model_dir):
    tok = Tokenizer.from_dir(model_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield GrammarBackend(tok, tok.vocab_size, tok.stop_token_ids), tok
    torch.set_num_threads(threads)


def decode(proc, eos: int, seed: int, favour: list[int], steps: int = 1500) -> list[int]:
    """Sample through the processor from random logits that favour `favour` (a model that writes markers eagerly)."""
    g, out = torch.Generator().manual_seed(seed), []
    for _ in range(steps):
        logits = torch.randn(proc.backend.vocab_size, generator=g)
        logits[favour] += 8.0
        t = int(torch.distributions.Categorical(logits=proc(out, logits)).sample())
        if t == eos:
            return out
        out.append(t)
    raise AssertionError("the grammar never let the sequence end")


def check_calls(tok, ids: list[int], names: set[str], count: range) -> list[dict]:
    content, calls = parse_tool_call_ids(tok, ids)
    assert content is None and len(calls) in count, (content, calls)
    marks = {m: tok.token_to_id(m) for m in (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)}
    # every marker token is at a layout position: one begin/end pair, one call-begin/sep/call-end per call
    assert [ids.count(marks[m]) for m in (CALLS_BEGIN, CALLS_END)] == [1, 1]
    assert [ids.count(marks[m]) for m in (CALL_BEGIN, SEP, CALL_END)] == [len(calls)] * 3
    for c in calls:
        assert c["function"]["name"] in names
        args = json.loads(c["function"]["arguments"])
        jsonschema_rs.validate(SCHEMAS[c["function"]["name"]], args)
    return calls


@pytest.mark.parametrize("tool", TOOLS, ids=lambda t: t["function"]["name"])
def test_forced_call_with_eager_markers_parses_and_validates(backend, tool):
    """String, integer and nested-object arguments: however much the model favours the marker tokens, they
    appear only in the layout (the old 'prefer marker' rule filled a string argument with them)."""
    b, tok = backend
    guide = ToolCallGuide(tok, b.control)
    named = {"type": "function", "function": {"name": tool["function"]["name"]}}
    from dsv3.serve.protocol import NamedToolChoice

    compiled = forced_call_grammar(b, [Tool.model_validate(t) for t in TOOLS], NamedToolChoice.model_validate(named))
    for seed in range(3):
        ids = decode(b.processor(compiled, guide), tok.eos_token_id, seed, marker_ids(tok))
        calls = check_calls(tok, ids, {tool["function"]["name"]}, range(1, 2))
        assert all(m not in calls[0]["function"]["arguments"] for m in (SEP, CALL_END, CALLS_BEGIN))


def test_required_allows_several_calls_unless_parallel_is_off(backend):
    b, tok = backend
    tools = [Tool.model_validate(t) for t in TOOLS]
    guide = ToolCallGuide(tok, b.control)
    many = b.processor(forced_call_grammar(b, tools, "required"), guide)
    seen = set()
    for seed in range(4):  # favouring the call-begin marker over calls-end makes several calls likely
        ids = decode(many, tok.eos_token_id, seed, [tok.token_to_id(CALL_BEGIN)])
        seen.add(len(check_calls(tok, ids, set(SCHEMAS), range(1, 9))))
    assert max(seen) > 1
    one = b.processor(forced_call_grammar(b, tools, "required", parallel=False), guide)
    for seed in range(2):
        check_calls(tok, decode(one, tok.eos_token_id, seed, [tok.token_to_id(CALL_BEGIN)]), set(SCHEMAS), range(1, 2))


def test_spelled_marker_text_inside_an_argument_stays_an_argument(backend):
    _, tok = backend
    begin, one, sep, end, close = (tok.token_to_id(m) for m in (CALLS_BEGIN, CALL_BEGIN, SEP, CALL_END, CALLS_END))
    args = json.dumps({"title": f"a {SEP} b {CALL_END}", "body": ""}, ensure_ascii=False)
    spelled = [i for ch in "save_note\n```json\n" + args + "\n```" for i in tok.encode(ch, add_special_tokens=False)]
    assert sep not in spelled and end not in spelled  # the marker texts, one character at a time
    ids = [begin, one] + tok.encode("function", add_special_tokens=False) + [sep] + spelled + [end, close]
    content, calls = parse_tool_call_ids(tok, ids)
    assert content is None and json.loads(calls[0]["function"]["arguments"])["title"] == f"a {SEP} b {CALL_END}"


@pytest.fixture(scope="module")
def srv(model_dir):
    with serve(model_dir, max_model_len=2048) as s:  # past the tiny model's 1024: three tool descriptions are long
        yield s


@pytest.mark.parametrize("tool", TOOLS, ids=lambda t: t["function"]["name"])
def test_openai_sdk_forced_calls(srv, tool):
    sdk = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    msgs = [{"role": "user", "content": "call the tool"}]
    named = {"type": "function", "function": {"name": tool["function"]["name"]}}
    for seed in (0, 1):
        r = sdk.chat.completions.create(model="tiny", messages=msgs, tools=[tool], tool_choice=named, max_tokens=300,
                                        seed=seed, temperature=1.0)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
        call = ch.message.tool_calls[0]
        assert call.function.name == tool["function"]["name"]
        jsonschema_rs.validate(SCHEMAS[call.function.name], json.loads(call.function.arguments))
    r = sdk.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, tool_choice="required", max_tokens=1200,
                                    seed=3, parallel_tool_calls=False)
    assert len(r.choices[0].message.tool_calls) == 1
    chunks = list(sdk.chat.completions.create(model="tiny", messages=msgs, tools=[tool], tool_choice=named, max_tokens=300,
                                              seed=5, stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == tool["function"]["name"]
    jsonschema_rs.validate(SCHEMAS[calls[0].function.name], json.loads(calls[0].function.arguments))


def test_langchain_bind_tools_any_and_structured_output(srv):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    llm = ChatOpenAI(model="tiny", base_url=srv.url + "/v1", api_key="x", max_tokens=1200, max_retries=0, seed=7)
    msg = llm.bind_tools(TOOLS, tool_choice="any").invoke("do something")
    assert msg.tool_calls and not msg.invalid_tool_calls
    for call in msg.tool_calls:
        jsonschema_rs.validate(SCHEMAS[call["name"]], call["args"])

    class Guest(BaseModel):
        name: str = Field(max_length=30)
        tags: list[str] = Field(max_length=3)

    class Booking(BaseModel):
        """Book a room."""

        guest: Guest
        nights: int = Field(ge=1, le=30)
        note: str = Field(max_length=40)

    booking = llm.with_structured_output(Booking, method="function_calling").invoke("book a room")
    assert isinstance(booking, Booking) and 1 <= booking.nights <= 30 and len(booking.note) <= 40


def test_llamaindex_structured_predict(srv):
    from llama_index.core.prompts import PromptTemplate
    from llama_index.llms.openai_like import OpenAILike
    from pydantic import BaseModel, Field

    class Song(BaseModel):
        """A song."""

        title: str = Field(max_length=40)
        year: int = Field(ge=1900, le=2100)

    llm = OpenAILike(model="tiny", api_base=srv.url + "/v1", api_key="x", max_tokens=300, max_retries=0,
                     context_window=2048, is_chat_model=True, is_function_calling_model=True)
    song = llm.structured_predict(Song, PromptTemplate("Name a song about {topic}."), topic="rain")
    assert isinstance(song, Song) and 1900 <= song.year <= 2100 and len(song.title) <= 40
