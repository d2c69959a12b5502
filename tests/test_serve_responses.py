"""OpenAI's Responses API (`POST /v1/responses`) through the openai SDK's `client.responses`: text and message-list
input, `instructions`, the streaming events, function tools, `previous_response_id` (bounded store, per API key),
and the fields that are refused. Texts are checked against the single-request generator on the same tiny model."""

from __future__ import annotations

import json

import jsonschema_rs
import openai
import pytest

from dsv3.engine.sampling import SamplingParams
from dsv3.serve import ServeConfig
from dsv3.serve.auth import APIKeys
from dsv3.serve.responses import ResponseStore
from dsv3.serve.tools import tools_system_prompt
from dsv3.serve.protocol import Tool
from serve_harness import model_dir, oracle, serve  # noqa: F401 (fixtures)

KEY_A, KEY_B = "responses-key-a", "responses-key-b"
NOTE = {"type": "function", "name": "save_note", "description": "store a note", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["title", "pages"],
    "properties": {"title": {"type": "string", "maxLength": 30}, "pages": {"type": "integer", "minimum": 1, "maximum": 99}}}}


@pytest.fixture(scope="module")
def srv(model_dir):
    cfg = ServeConfig(served_model_name="tiny", keys=APIKeys.build([KEY_A, KEY_B]))
    with serve(model_dir, cfg, max_model_len=1024) as s:
        yield s


@pytest.fixture(scope="module")
def ref(model_dir):
    return oracle(model_dir, max_model_len=1024)


def sdk(srv, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)


def greedy(ref, messages: list[dict], n: int):
    gen, tok = ref
    ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    return gen.complete(ids, SamplingParams(max_tokens=n, temperature=0)), len(ids)


def expect(resp, want, n_prompt: int) -> None:
    """A non-streamed response against the oracle's greedy output."""
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.model == "tiny"
    assert resp.output_text == want.text and [o.type for o in resp.output] == ["message"]
    assert resp.output[0].role == "assistant" and resp.output[0].content[0].type == "output_text"
    cut = want.finish_reason == "length"
    assert resp.status == ("incomplete" if cut else "completed")
    assert (resp.incomplete_details.reason if cut else resp.incomplete_details) == ("max_output_tokens" if cut else None)
    assert resp.usage.input_tokens == n_prompt and resp.usage.output_tokens == len(want.token_ids)
    assert resp.usage.total_tokens == n_prompt + len(want.token_ids)


def test_text_input_with_instructions(srv, ref):
    r = sdk(srv).responses.create(model="tiny", input="Write a function that adds two numbers.",
                                  instructions="You are a concise Python assistant.", max_output_tokens=12, temperature=0)
    want, n = greedy(ref, [{"role": "system", "content": "You are a concise Python assistant."},
                           {"role": "user", "content": "Write a function that adds two numbers."}], 12)
    expect(r, want, n)
    assert r.instructions == "You are a concise Python assistant." and r.max_output_tokens == 12


def test_message_list_input(srv, ref):
    items = [{"role": "developer", "content": "Answer in Python."},
             {"role": "user", "content": "def add(a, b):"},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "return a + b"}]},
             {"role": "user", "content": [{"type": "input_text", "text": "Now "}, {"type": "input_text", "text": "subtract."}]}]
    r = sdk(srv).responses.create(model="tiny", input=items, max_output_tokens=10, temperature=0)
    want, n = greedy(ref, [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "def add(a, b):"},
                           {"role": "assistant", "content": "return a + b"}, {"role": "user", "content": "Now subtract."}], 10)
    expect(r, want, n)


def test_stream_events(srv, ref):
    """The event sequence OpenAI sends, numbered from 0; the deltas spell the non-streamed text."""
    events = list(sdk(srv).responses.create(model="tiny", input="def fib(n):", max_output_tokens=16, temperature=0,
                                            stream=True))
    want, n = greedy(ref, [{"role": "user", "content": "def fib(n):"}], 16)
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    last = "response.incomplete" if want.finish_reason == "length" else "response.completed"
    assert kinds == (["response.created", "response.in_progress", "response.output_item.added",
                      "response.content_part.added"] + ["response.output_text.delta"] * len(deltas) +
                     ["response.output_text.done", "response.content_part.done", "response.output_item.done", last])
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert len(deltas) > 1 and "".join(deltas) == want.text  # text arrives as it is generated, not at the end
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == want.text and done.item_id == events[2].item.id == events[-2].item.id
    expect(events[-1].response, want, n)
    assert events[-1].response.output[0].id == done.item_id
    assert events[-1].response.id == events[0].response.id


def test_sdk_stream_helper_with_structured_text(srv):
    """`client.responses.stream(...)`: the SDK rebuilds the response from the events; `text.format` json_schema
    ends the output when the object is complete, so the stream ends with response.completed."""
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "size"],
              "properties": {"name": {"type": "string", "maxLength": 12}, "size": {"type": "integer", "minimum": 0, "maximum": 9}}}
    fmt = {"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}}
    with sdk(srv).responses.stream(model="tiny", input="Describe a thing.", text=fmt, max_output_tokens=200,
                                   temperature=1.0, extra_body={"seed": 3}) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == "".join(deltas)
    jsonschema_rs.validate(schema, json.loads(final.output_text))
    assert final.text.format.type == "json_schema"


def test_function_tools_and_their_outputs(srv, ref):
    """A forced call comes back as a function_call item whose arguments validate, streamed or not; its output
    continues the conversation through previous_response_id, as the chat route would run the same turns."""
    client = sdk(srv)
    r = client.responses.create(model="tiny", input="Save a note.", tools=[NOTE], tool_choice="required",
                                max_output_tokens=300, temperature=1.0, extra_body={"seed": 1})
    calls = [o for o in r.output if o.type == "function_call"]
    assert r.status == "completed" and len(calls) >= 1 and calls[0].name == "save_note" and calls[0].call_id
    for c in calls:
        jsonschema_rs.validate(NOTE["parameters"], json.loads(c.arguments))
    named = client.responses.create(model="tiny", input="Save a note.", tools=[NOTE], max_output_tokens=300, extra_body={"seed": 2},
                                    tool_choice={"type": "function", "name": "save_note"}, parallel_tool_calls=False)
    assert [o.type for o in named.output] == ["function_call"]
    events = list(client.responses.create(model="tiny", input="Save a note.", tools=[NOTE], tool_choice="required",
                                          max_output_tokens=300, extra_body={"seed": 4}, stream=True, parallel_tool_calls=False))
    args = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert events[-1].type == "response.completed" and len(args) == 1 and args[0].name == "save_note"
    assert events[-1].response.output[-1].arguments == args[0].arguments
    jsonschema_rs.validate(NOTE["parameters"], json.loads(args[0].arguments))

    # the call's result, sent back with previous_response_id (the tools come again: they are not carried over)
    call = calls[0]
    nxt = client.responses.create(model="tiny", previous_response_id=r.id, tools=[NOTE], max_output_tokens=10,
                                  temperature=0, input=[{"type": "function_call_output", "call_id": call.call_id,
                                                         "output": "saved"}])
    assert nxt.previous_response_id == r.id
    tool_calls = [{"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                  for c in calls]
    chat = [{"role": "system", "content": tools_system_prompt([Tool.model_validate(
                {"type": "function", "function": {k: v for k, v in NOTE.items() if k != "type"}})])},
            {"role": "user", "content": "Save a note."}, {"role": "assistant", "content": None, "tool_calls": tool_calls},
            {"role": "tool", "content": "saved", "tool_call_id": call.call_id}]
    gen, tok = ref
    ids = tok.encode(tok.apply_chat_template(chat), add_special_tokens=False)
    want = gen.complete(ids, SamplingParams(max_tokens=10, temperature=0))
    text = "".join(o.content[0].text for o in nxt.output if o.type == "message")
    assert nxt.usage.input_tokens == len(ids)
    if all(o.type == "message" for o in nxt.output):
        assert text == want.text
    else:  # the model chose to call again: the plain text before its call is what the oracle wrote before it
        assert want.text.startswith(text)


def test_previous_response_id_continues_the_conversation(srv, ref):
    client = sdk(srv)
    first = client.responses.create(model="tiny", input="def add(a, b):", instructions="Only code.",
                                    max_output_tokens=8, temperature=0)
    second = client.responses.create(model="tiny", input="And multiply?", previous_response_id=first.id,
                                     max_output_tokens=8, temperature=0)
    # instructions are not carried over (as in OpenAI): the second turn runs without the system message
    want, n = greedy(ref, [{"role": "user", "content": "def add(a, b):"},
                           {"role": "assistant", "content": first.output_text},
                           {"role": "user", "content": "And multiply?"}], 8)
    expect(second, want, n)
    third = client.responses.create(model="tiny", input="Now divide.", previous_response_id=second.id,
                                    instructions="Only code.", max_output_tokens=8, temperature=0)
    want, n = greedy(ref, [{"role": "system", "content": "Only code."}, {"role": "user", "content": "def add(a, b):"},
                           {"role": "assistant", "content": first.output_text},
                           {"role": "user", "content": "And multiply?"},
                           {"role": "assistant", "content": second.output_text},
                           {"role": "user", "content": "Now divide."}], 8)
    expect(third, want, n)
    assert client.responses.retrieve(second.id).output_text == second.output_text


def test_stored_responses_belong_to_their_key(srv):
    a, b = sdk(srv, KEY_A), sdk(srv, KEY_B)
    r = a.responses.create(model="tiny", input="hello", max_output_tokens=4, temperature=0)
    with pytest.raises(openai.NotFoundError) as e:
        b.responses.create(model="tiny", input="go on", previous_response_id=r.id, max_output_tokens=4)
    assert e.value.body["param"] == "previous_response_id" and e.value.body["code"] == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        b.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        b.responses.delete(r.id)
    with pytest.raises(openai.AuthenticationError):
        sdk(srv, "not-a-key").responses.retrieve(r.id)
    assert a.responses.retrieve(r.id).id == r.id  # B's attempts changed nothing
    a.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        a.responses.create(model="tiny", input="go on", previous_response_id=r.id, max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        a.responses.retrieve(r.id)


def test_store_false_keeps_nothing(srv):
    a = sdk(srv)
    r = a.responses.create(model="tiny", input="hello", max_output_tokens=4, temperature=0, store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        a.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        a.responses.create(model="tiny", input="go on", previous_response_id=r.id, max_output_tokens=4)


@pytest.mark.parametrize("extra, param", [
    ({"reasoning": {"effort": "high"}}, "reasoning"), ({"truncation": "auto"}, "truncation"),
    ({"include": ["message.output_text.logprobs"]}, "include"), ({"background": True}, "background"),
    ({"top_logprobs": 3}, "top_logprobs"), ({"max_tool_calls": 2}, "max_tool_calls"),
    ({"conversation": "conv_1"}, "conversation"), ({"extra_body": {"moderation": {"model": "m"}}}, "moderation"),
    ({"extra_body": {"context_management": [{"type": "compaction"}]}}, "context_management"),
    ({"text": {"verbosity": "low"}}, "text.verbosity"), ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "web_search"}]}, None), ({"max_output_tokens": 0}, None), ({"input": []}, None)])
def test_unsupported_fields_are_400s(srv, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        sdk(srv).responses.create(**{"model": "tiny", "input": "hi", "max_output_tokens": 4, **extra})
    if param is not None:
        assert e.value.body["param"] == param


def test_the_store_is_bounded_in_entries_and_bytes(model_dir):
    cfg = ServeConfig(served_model_name="tiny", responses_max_entries=2, responses_max_bytes=1 << 20)
    with serve(model_dir, cfg, max_model_len=256) as s:
        client = sdk(s, "x")
        ids = [client.responses.create(model="tiny", input=f"turn {i}", max_output_tokens=3, temperature=0).id
               for i in range(3)]
        with pytest.raises(openai.NotFoundError):  # least recently used first out
            client.responses.retrieve(ids[0])
        assert [client.responses.retrieve(i).id for i in ids[1:]] == ids[1:] and len(s.state.responses) == 2
    store = ResponseStore(max_entries=10, max_bytes=600)
    assert store.put("r1", "k", {"x": "a" * 200}, []) and store.put("r2", "k", {"x": "b" * 200}, [])
    assert store.get("r1", "k") is not None  # r1 is now the most recently used
    assert store.put("r3", "k", {"x": "c" * 200}, [])  # over 600 bytes: r2 goes
    assert store.get("r2", "k") is None and store.get("r1", "k") is not None and store.bytes <= 600
    assert not store.put("big", "k", {"x": "d" * 700}, []) and len(store) == 2  # never fits: not stored, nothing dropped
    assert store.get("r1", "other") is None and not store.delete("r1", None) and store.delete("r1", "k")


def test_informational_and_unknown_fields_are_accepted(srv, ref):
    r = sdk(srv).responses.create(model="tiny", input="hello", max_output_tokens=4, temperature=0, user="u1",
                                  metadata={"ticket": "42"}, prompt_cache_key="k", service_tier="auto",
                                  safety_identifier="s1", prompt_cache_retention="24h", truncation="disabled",
                                  reasoning={"effort": None}, include=[], extra_body={"frobnicate": {"a": 1}})
    want, n = greedy(ref, [{"role": "user", "content": "hello"}], 4)
    expect(r, want, n)
    assert r.metadata == {"ticket": "42"} and r.user == "u1" and r.truncation == "disabled"
