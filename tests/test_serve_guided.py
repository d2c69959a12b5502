"""vLLM's structured-output fields (issue 20, item 2): guided_json / guided_choice / guided_regex / guided_grammar and
`structured_outputs` on chat and completions, through the openai SDK's extra_body; outputs validate, conflicts and
over-limit grammars are 400s, and what is not supported is refused, never ignored."""

from __future__ import annotations

import json
import re

import jsonschema_rs
import openai
import pytest

from serve_harness import serve, tiny_model_dir

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "size"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "size": {"type": "integer", "minimum": 0, "maximum": 9}}}
REGEX = r"[a-f]{2,5}-[0-9]{3}"
CHOICES = ["red", "green", "deep blue"]
GRAMMAR = 'root ::= "(" item ("," item)* ")"\nitem ::= [0-9] | "x"'
GRAMMAR_RE = r"\((?:[0-9]|x)(?:,(?:[0-9]|x))*\)"


@pytest.fixture(scope="module")
def sdk(tmp_path_factory):
    with serve(tiny_model_dir(tmp_path_factory), max_model_len=512) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)


CASES = [
    ({"guided_json": SCHEMA}, lambda t: jsonschema_rs.validate(SCHEMA, json.loads(t))),
    ({"guided_json": json.dumps(SCHEMA)}, lambda t: jsonschema_rs.validate(SCHEMA, json.loads(t))),
    ({"structured_outputs": {"json": SCHEMA}}, lambda t: jsonschema_rs.validate(SCHEMA, json.loads(t))),
    ({"guided_choice": CHOICES}, lambda t: t in CHOICES or pytest.fail(t)),
    ({"structured_outputs": {"choice": CHOICES}}, lambda t: t in CHOICES or pytest.fail(t)),
    ({"guided_regex": REGEX}, lambda t: re.fullmatch(REGEX, t) or pytest.fail(t)),
    ({"structured_outputs": {"regex": REGEX}}, lambda t: re.fullmatch(REGEX, t) or pytest.fail(t)),
    ({"guided_grammar": GRAMMAR}, lambda t: re.fullmatch(GRAMMAR_RE, t) or pytest.fail(t)),
    ({"structured_outputs": {"grammar": GRAMMAR}}, lambda t: re.fullmatch(GRAMMAR_RE, t) or pytest.fail(t)),
    # any object: a random model may not close it within max_tokens, so only its start is certain
    ({"structured_outputs": {"json_object": True}}, lambda t: t.startswith("{") or pytest.fail(t)),
]


@pytest.mark.parametrize("extra,check", CASES, ids=lambda c: json.dumps(c)[:40] if isinstance(c, dict) else "")
def test_guided_outputs_validate_on_chat_and_completions(sdk, extra, check):
    r = sdk.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "go"}], n=2, seed=1,
                                    temperature=1.0, max_tokens=80, extra_body=extra)
    complete = "json_object" not in json.dumps(extra)
    for ch in r.choices:
        assert ch.finish_reason == "stop" or not complete, ch.message.content
        check(ch.message.content)
    r = sdk.completions.create(model="tiny", prompt="x =", max_tokens=80, temperature=0.9, seed=2, extra_body=extra)
    assert r.choices[0].finish_reason == "stop" or not complete
    check(r.choices[0].text)


@pytest.mark.parametrize("extra,match", [
    ({"guided_choice": ["a"], "guided_regex": "b"}, "give only one"),
    ({"guided_json": SCHEMA, "response_format": {"type": "json_object"}}, "give only one"),
    ({"guided_json": "{not json"}, "not valid JSON"),
    ({"guided_choice": []}, "non-empty list"),
    ({"guided_regex": "^a{1,30000}$"}, "grammar-max-repeat"),
    ({"guided_grammar": "root ::= "}, "cannot be compiled"),
    ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
    ({"guided_whitespace_pattern": r"\s*"}, "not supported"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "not supported"),
    ({"guided_json": SCHEMA, "min_tokens": 3}, "min_tokens"),
])
def test_bad_or_conflicting_guided_fields_are_400(sdk, extra, match):
    with pytest.raises(openai.BadRequestError, match=match):
        sdk.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "go"}], max_tokens=8, extra_body=extra)
