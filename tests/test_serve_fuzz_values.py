"""Generated requests with extreme values: never a 5xx, the engine stays alive, a normal request works after each.

Hypothesis builds chat and completions bodies (valid JSON, Python's dialect included: NaN and
Infinity are what `json.dumps` writes for those floats) whose fields take boundary and absurd
values -- 2**64 top_k, NaN temperatures, out-of-vocabulary stop ids, lone surrogates, special-token
text, unsatisfiable or costly schemas, forced tool calls, huge n -- and sometimes a value of the
wrong type. After every case the server must answer /health with 200 and serve a plain request, and
at the end no request may have failed inside the engine (`dsv3:request_errors_total` 0): a request
that gets past validation must be one the engine can run. The default suite runs 300 cases; the
slow test runs 3,000.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_harness import serve, tiny_model_dir

INTS = st.sampled_from([-(2 ** 64), -(2 ** 63) - 1, -(2 ** 63), -(2 ** 31), -2, -1, 0, 1, 2, 3, 5, 17, 64, 129, 2 ** 31 - 1,
                        2 ** 31, 2 ** 53 + 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64, 10 ** 30])
FLOATS = st.sampled_from([float("nan"), float("inf"), float("-inf"), -1e308, -2.5, -1.0, -0.0, 0.0, 5e-324, 1e-45, 1e-6,
                          0.1, 0.5, 0.999999, 1.0, 1.0000001, 1.5, 2.0, 2.0000001, 10.0, 100.0, 1e308])
NUMBER = st.one_of(INTS, FLOATS, st.integers(-3, 70), st.floats(allow_nan=True, allow_infinity=True))
TEXT = st.one_of(
    st.sampled_from(["", " ", "def f(", "x" * 3000, "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "<｜fim▁hole｜>",
                     "<｜tool▁calls▁begin｜>", "\x00", "\u2028\u2029", "\ud800", "a\udc00b", "😀" * 40, "{", "null",
                     "\\u0000", "```json\n", "\n" * 200]),
    st.text(max_size=30))
ANY = st.recursive(st.none() | st.booleans() | NUMBER | TEXT,
                   lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4), max_leaves=8)

LEAF_SCHEMAS = st.sampled_from([
    {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}, {},
    {"type": "string", "maxLength": 0}, {"type": "string", "minLength": 5, "maxLength": 2},
    {"type": "integer", "minimum": 5, "maximum": 1}, {"enum": []}, {"enum": [1, "a", None, [], {}]}, {"const": "x"},
    {"type": "string", "pattern": "^a{1,5000}$"}, {"type": "string", "pattern": "(("}, {"type": "string", "pattern": "^$"},
    {"type": "string", "format": "email"}, {"type": "frobnicate"}, {"$ref": "#/definitions/nope"},
    {"type": "array", "minItems": 3, "maxItems": 1}, {"type": "array", "minItems": 100000},
    {"type": "string", "maxLength": 10 ** 12}, {"not": {}}, {"allOf": [{"type": "string"}, {"type": "integer"}]},
    {"type": ["string", "integer"]}, {"type": "object", "additionalProperties": False, "required": ["missing"]},
])
SCHEMAS = st.recursive(
    LEAF_SCHEMAS,
    lambda ch: st.one_of(
        st.builds(lambda props, req: {"type": "object", "properties": props, "required": req},
                  st.dictionaries(st.text(max_size=6), ch, max_size=3), st.lists(st.text(max_size=6), max_size=2)),
        st.builds(lambda it: {"type": "array", "items": it}, ch),
        st.builds(lambda xs: {"anyOf": xs}, st.lists(ch, min_size=1, max_size=3))),
    max_leaves=6)


def field(*valid, absurd=None, weight: int = 8):
    """Mostly (`weight` in `weight` + 2) a valid value from the edges of the field's domain; else an absurd one or
    any JSON value."""
    edge = st.sampled_from(list(valid)) if not isinstance(valid[0], st.SearchStrategy) else st.one_of(*valid)
    odd = absurd if absurd is not None else INTS
    return st.integers(0, weight + 1).flatmap(lambda i: edge if i < weight else odd if i == weight else ANY)


TOKEN_IDS = st.one_of(st.integers(0, 300), st.sampled_from([0, 1, 2, 3, 299, 300]))
SAMPLING = {
    "n": field(1, 2, 3, 8, 9, absurd=INTS),
    "max_tokens": field(st.integers(1, 70), st.just(2 ** 31)),
    "min_tokens": field(st.integers(0, 70)),
    "temperature": field(0, 0.0, 5e-324, 1e-45, 1e-6, 0.5, 1.0, 1.999999, 2.0, absurd=FLOATS),
    "top_p": field(5e-324, 1e-45, 1e-6, 0.5, 1.0, absurd=FLOATS),
    "top_k": field(-1, 0, 1, 2, 299, 300, 301, 2 ** 31, 2 ** 63 - 1, 2 ** 63, 2 ** 64, 10 ** 30),
    "min_p": field(0, 5e-324, 0.5, 0.999999, 1.0, absurd=FLOATS),
    "seed": field(-(2 ** 63), -1, 0, 1, 2 ** 63 - 1),
    "presence_penalty": field(-2, -1e-45, 0, 1e-45, 2, absurd=FLOATS),
    "frequency_penalty": field(-2, -1e-45, 0, 1e-45, 2, absurd=FLOATS),
    "repetition_penalty": field(5e-324, 1e-45, 0.01, 1, 9.999, 10, absurd=FLOATS),
    "stop": field(TEXT, st.lists(TEXT, max_size=5)),
    "stop_token_ids": field(st.lists(TOKEN_IDS, max_size=4), absurd=st.lists(INTS, max_size=3)),
    "logit_bias": field(st.dictionaries(TOKEN_IDS.map(str), st.sampled_from([-100, -100.0, -1e-45, 0, 5, 100]), max_size=6),
                        absurd=st.dictionaries(st.sampled_from(["1e3", "x", "-0", "-1", str(2 ** 70), "999999"]), NUMBER,
                                               max_size=3)),
    "ignore_eos": field(True, False),
    "stream": st.booleans(),
    "stream_options": field({"include_usage": True}, {"include_usage": False}),
    "user": field(TEXT),
    "best_of": field(1, 2, 5),
    "response_format": field(
        st.just({"type": "json_object"}), st.just({"type": "text"}),
        st.builds(lambda s: {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}, SCHEMAS),
        st.builds(lambda s: {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}, SCHEMAS)),
}
MESSAGES = field(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer", "tool"]),
                                                 "content": field(TEXT, weight=30)}), min_size=1, max_size=3),
                 weight=30)
CHAT = {
    **SAMPLING,
    "logprobs": field(True, False), "top_logprobs": field(0, 1, 20, 21),
    "max_completion_tokens": field(st.integers(1, 70)),
    "tools": field(st.lists(st.builds(lambda name, s: {"type": "function", "function": {"name": name, "parameters": s}},
                                      st.sampled_from(["f", "get_weather", "x" * 64]), SCHEMAS), min_size=1, max_size=2)),
    "tool_choice": field("none", "auto", "required", {"type": "function", "function": {"name": "f"}}),
}
PROMPT = field(TEXT, st.lists(TEXT, min_size=1, max_size=3), st.lists(TOKEN_IDS, min_size=1, max_size=8),
               st.lists(st.lists(TOKEN_IDS, min_size=1, max_size=4), min_size=1, max_size=3),
               absurd=st.lists(INTS, max_size=4), weight=30)
COMPLETIONS = {**SAMPLING, "echo": field(True, False), "logprobs": field(0, 1, 5, 20, 21), "suffix": field(TEXT)}


def some_of(fields: dict, required: dict) -> st.SearchStrategy:
    """The required fields plus up to four of the optional ones (more would make nearly every body a 400)."""
    return st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({**required, **{k: fields[k] for k in keys}}))


BODIES = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), some_of(CHAT, {"messages": MESSAGES})),
    st.tuples(st.just("/v1/chat/completions"), some_of(CHAT, {"messages": MESSAGES})),
    st.tuples(st.just("/v1/completions"), some_of(COMPLETIONS, {"prompt": PROMPT})),
    st.tuples(st.just("/v1/completions"), some_of(COMPLETIONS, {"prompt": PROMPT})),
    st.tuples(st.just("/tokenize"), some_of({"prompt": TEXT, "messages": MESSAGES, "add_special_tokens": field(True, False)}, {})),
    st.tuples(st.just("/detokenize"), st.fixed_dictionaries({"tokens": st.lists(st.one_of(INTS, TOKEN_IDS), max_size=5)})),
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serve(tiny_model_dir(tmp_path_factory), max_model_len=64, max_num_seqs=8) as srv:
        yield srv


def run_fuzz(server, examples: int) -> int:
    seen = {"cases": 0, "statuses": {}}
    c = httpx.Client(base_url=server.url, timeout=120)

    @given(case=BODIES)
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    def fuzz(case):
        route, body = case
        seen["cases"] += 1
        raw = json.dumps(body)  # Python's JSON: NaN / Infinity spelled as clients like the openai SDK send them
        r = c.post(route, content=raw, headers={"content-type": "application/json"})
        seen["statuses"][r.status_code] = seen["statuses"].get(r.status_code, 0) + 1
        assert r.status_code < 500, (route, raw[:600], r.text[:400])
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text[:300]
        elif body.get("stream") is True and route.startswith("/v1/"):
            assert r.text.endswith("data: [DONE]\n\n")
            assert '"error"' not in r.text, (route, raw[:600], r.text[-400:])  # no in-band failure either
        assert c.get("/health").status_code == 200
        ok = c.post("/v1/completions", json={"prompt": "def f", "max_tokens": 2, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2

    fuzz()
    c.close()
    assert server.engine.stats["request_errors"] == 0  # nothing got past validation that the engine could not run
    deadline = time.monotonic() + 5  # the last response's slot is given back just after its last byte
    while server.state.inflight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.state.inflight == 0
    assert seen["statuses"].get(200, 0) >= examples // 10, seen["statuses"]  # the generator reaches generation too
    return seen["cases"]


def test_fuzz_extreme_values(server):
    assert run_fuzz(server, 300) >= 300


@pytest.mark.slow
def test_fuzz_extreme_values_thousands(server):
    assert run_fuzz(server, 3000) >= 3000
