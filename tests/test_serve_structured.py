"""Grammar-constrained output (JSON schema, json_object, forced tool calls) and DeepSeek tool-call parsing."""

from __future__ import annotations

import json

import jsonschema_rs
import openai
import pytest
import torch

from dsv3.io.chat_template import DEEPSEEK_V3_CHAT_TEMPLATE, render_chat_template
from dsv3.serve.errors import APIError
from dsv3.serve.protocol import Tool
from dsv3.serve.structured import GrammarBackend
from dsv3.serve.tools import ToolCallGuide, forced_call_grammar, marker_ids, parse_tool_call_ids, parse_tool_calls
from dsv3.io.tokenizer import Tokenizer
from serve_harness import serve, tiny_model_dir

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "ok", "color", "n"],
          "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"},
                         "color": {"enum": ["red", "green"]}, "n": {"type": "integer", "minimum": 0, "maximum": 99}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                             "parameters": {"type": "object", "additionalProperties": False,
                                                            "required": ["city"],
                                                            "properties": {"city": {"type": "string", "maxLength": 6}}}}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def backend(model_dir):
    tok = Tokenizer.from_dir(model_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops: threading only adds overhead
    yield GrammarBackend(tok, tok.vocab_size, tok.stop_token_ids), tok
    torch.set_num_threads(threads)


def random_decode(proc, eos: int, seed: int, steps: int = 400) -> list[int]:
    """Sample from random logits through the processor: the grammar alone must make the output valid."""
    g, out = torch.Generator().manual_seed(seed), []
    for _ in range(steps):
        t = int(torch.distributions.Categorical(logits=proc(out, torch.randn(proc.backend.vocab_size, generator=g))).sample())
        if t == eos:
            return out
        out.append(t)
    raise AssertionError("the grammar never let the sequence end")


def test_json_schema_grammar_always_validates(backend):
    b, tok = backend
    compiled = b.compile("json_schema", SCHEMA)
    for seed in range(8):
        text = tok.decode(random_decode(b.processor(compiled), tok.eos_token_id, seed), skip_special_tokens=False)
        jsonschema_rs.validate(SCHEMA, json.loads(text))


def test_processor_tracks_diverging_sequences(backend):
    b, tok = backend
    proc = b.processor(b.compile("json_object"))
    a = random_decode(proc, tok.eos_token_id, 1)
    c = random_decode(proc, tok.eos_token_id, 2)  # same processor, a different sequence
    for ids in (a, c):
        assert isinstance(json.loads(tok.decode(ids, skip_special_tokens=False)), dict)


def test_bad_schema_is_a_400(backend):
    b, _ = backend
    with pytest.raises(APIError) as e:
        b.compile("json_schema", {"type": "object", "properties": {"x": {"type": "frobnicate"}}})
    assert e.value.status == 400


def test_tool_calls_round_trip_through_deepseek_template():
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}}]}]
    text = render_chat_template(DEEPSEEK_V3_CHAT_TEMPLATE, msgs, add_generation_prompt=False, bos_token="")
    reply = text[text.index("<｜Assistant｜>") + len("<｜Assistant｜>"):].replace("<｜end▁of▁sentence｜>", "")
    content, calls = parse_tool_calls(reply)
    assert content is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    assert parse_tool_calls("just text") == ("just text", [])


def test_forced_tool_grammar_yields_one_valid_call(backend):
    b, tok = backend
    tools = [Tool.model_validate(WEATHER)]
    proc = b.processor(forced_call_grammar(b, tools, "required", parallel=False), ToolCallGuide(tok, b.control))
    for seed in range(4):
        ids = random_decode(proc, tok.eos_token_id, seed)
        assert set(marker_ids(tok)) <= set(ids)  # markers come out as their special tokens
        _, calls = parse_tool_call_ids(tok, ids)
        assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather"
        jsonschema_rs.validate(WEATHER["function"]["parameters"], json.loads(calls[0]["function"]["arguments"]))


@pytest.fixture(scope="module")
def sdk(model_dir):
    with serve(model_dir, max_model_len=512) as srv:  # the tool description makes prompts long
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)


def test_server_json_schema_response_validates(sdk):
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    r = sdk.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a thing"}], n=3, seed=3,
                                    temperature=1.0, max_tokens=120, response_format=fmt)
    for ch in r.choices:
        assert ch.finish_reason == "stop"
        jsonschema_rs.validate(SCHEMA, json.loads(ch.message.content))
    r = sdk.completions.create(model="tiny", prompt="{", max_tokens=120, temperature=0.8, seed=1,
                               extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(r.choices[0].text), dict)


def test_server_tool_calls(sdk):
    msgs = [{"role": "user", "content": "weather in Paris?"}]
    r = sdk.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER], tool_choice="required", max_tokens=80,
                                    parallel_tool_calls=False)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
    call = ch.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema_rs.validate(WEATHER["function"]["parameters"], json.loads(call.function.arguments))
    named = {"type": "function", "function": {"name": "get_weather"}}
    chunks = list(sdk.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER], tool_choice=named,
                                              max_tokens=80, stream=True))
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].function.name == "get_weather"
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]
    kw = dict(model="tiny", messages=msgs, tools=[WEATHER], tool_choice="auto", max_tokens=12, temperature=0)
    whole = sdk.chat.completions.create(**kw).choices[0].message
    streamed = list(sdk.chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == (whole.content or "")
    assert len([tc for c in streamed for tc in (c.choices[0].delta.tool_calls or [])]) == len(whole.tool_calls or [])
    with pytest.raises(openai.BadRequestError, match="not in 'tools'"):
        sdk.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER],
                                    tool_choice={"type": "function", "function": {"name": "nope"}})


def test_utf8_state_machine_matches_the_decoder():
    import random

    from dsv3.serve.utf8 import ACCEPT, ERROR, run
    rng = random.Random(0)
    for _ in range(20000):
        data = bytes(rng.choice([rng.randrange(256), rng.randrange(0x80, 0xC0), rng.choice([0xE0, 0xED, 0xF0, 0xF4, 0xC2])])
                     for _ in range(rng.randint(1, 4)))
        try:
            data.decode("utf-8")
            valid_prefix = True
        except UnicodeDecodeError as e:
            valid_prefix = e.reason == "unexpected end of data" and e.end == len(data)  # only cut short
        assert (run(ACCEPT, data) != ERROR) == valid_prefix, data


def test_grammar_strings_stay_valid_utf8(backend):
    """xgrammar alone lets a string continue ED A0..BF (a UTF-8-encoded surrogate, decoded as three
    U+FFFD, so a 6-character maxLength came out as 8 — seen through the server's tool calls)."""
    b, tok = backend
    proc = b.processor(b.compile("json_schema", json.dumps(WEATHER["function"]["parameters"])))
    byte_id = {v: i for i, v in enumerate(b.info.decoded_vocab) if len(v) == 1}
    prefix = tok.encode('{"city": "', add_special_tokens=False) + [byte_id[b"\xed"]]
    row = proc(prefix, torch.zeros(b.vocab_size))
    assert torch.isfinite(row[byte_id[b"\x80"]]) and torch.isfinite(row[byte_id[b"\x9f"]])  # ED 80..9F: U+D000..U+D7FF
    assert row[byte_id[b"\xa0"]] == float("-inf") and row[byte_id[b"\xac"]] == float("-inf")
    assert row[byte_id[b"a"]] == float("-inf")  # a lead byte needs its continuation


def test_logprob_bytes_are_the_tokens_own_bytes(backend):
    """OpenAI's `bytes` let a client rebuild text split inside a character: a token holding one byte
    of a 3-byte character reports that byte, not the U+FFFD its text alone decodes to."""
    from dsv3.serve.generation import token_bytes

    _, tok = backend
    text = "héllo 你好 😀 Œ\n\tx"
    ids = tok.encode(text, add_special_tokens=False)
    assert b"".join(bytes(token_bytes(tok, i)) for i in ids) == text.encode()
    assert bytes(token_bytes(tok, tok.eos_token_id)).decode() == tok.decode([tok.eos_token_id], skip_special_tokens=False)
