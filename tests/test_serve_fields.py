"""Every field a client sends is honoured or refused (issue 20, item 5): min_tokens and stop strings,
include_stop_str_in_output, return_tokens_as_token_ids, return_token_ids, continuous_usage_stats, best_of, top_logprobs
without logprobs, GET /v1/models/{id}, text_offset (echoed and streamed), allowed_token_ids, skip_special_tokens,
add_generation_prompt, cache_salt; known-but-unsupported fields are 400s, unknown ones are ignored."""

from __future__ import annotations

import json

import openai
import pytest

from dsv3.engine.sampling import SamplingParams
from serve_harness import client, model_dir, oracle, ref, serve, srv  # noqa: F401 (fixtures)

PROMPT = "def add(a, b):"


def greedy_ids(ref, prompt: str, n: int) -> list[int]:
    gen, tok = ref
    return gen.complete(tok.encode(prompt), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)).token_ids


def post(srv, route: str, body: dict) -> dict:
    with client(srv) as c:
        r = c.post(route, json=body)
        assert r.status_code == 200, r.text
        return r.json()


def test_min_tokens_holds_back_stop_strings_and_stop_str_can_be_kept(srv, ref):
    _, tok = ref
    ids = greedy_ids(ref, PROMPT, 24)
    texts = [tok.decode(ids[:k]) for k in range(len(ids) + 1)]
    full = texts[-1]
    stop = next(full[i:i + 2] for i in range(len(full) - 1) if full.count(full[i:i + 2]) >= 2)  # occurs at least twice
    first = full.index(stop)
    base = dict(prompt=PROMPT, max_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
    assert post(srv, "/v1/completions", base)["choices"][0]["text"] == full[:first]
    kept = post(srv, "/v1/completions", {**base, "include_stop_str_in_output": True})["choices"][0]
    assert kept["text"] == full[:first + len(stop)] and kept["finish_reason"] == "stop"
    k = next(k for k in range(1, len(ids)) if len(texts[k]) >= first + len(stop))  # the stop string is complete here
    held = post(srv, "/v1/completions", {**base, "min_tokens": k + 1})["choices"][0]["text"]
    guard = len(texts[k])  # the text before the (k+1)-th token: a stop string must end past it
    later = next((i for i in range(len(full)) if full.startswith(stop, i) and i + len(stop) > guard), None)
    assert held == (full if later is None else full[:later]) and len(held) > first


def test_token_ids_as_logprob_tokens_and_in_the_body(srv):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 1,
            "return_tokens_as_token_ids": True, "return_token_ids": True}
    ch = post(srv, "/v1/completions", body)["choices"][0]
    assert ch["logprobs"]["tokens"] == [f"token_id:{i}" for i in ch["token_ids"]] and len(ch["token_ids"]) == 5
    assert all(k.startswith("token_id:") for d in ch["logprobs"]["top_logprobs"] for k in d)
    r = post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                          "temperature": 0, "logprobs": True, "top_logprobs": 2,
                                          "return_tokens_as_token_ids": True, "return_token_ids": True})
    ch = r["choices"][0]
    assert [c["token"] for c in ch["logprobs"]["content"]] == [f"token_id:{i}" for i in ch["token_ids"]]
    assert len(r["prompt_token_ids"]) == r["usage"]["prompt_tokens"]


def test_add_generation_prompt_and_skip_special_tokens(srv, ref):
    _, tok = ref
    msgs = [{"role": "user", "content": "hi"}]
    on = post(srv, "/v1/chat/completions", {"messages": msgs, "max_tokens": 1, "return_token_ids": True})
    off = post(srv, "/v1/chat/completions", {"messages": msgs, "max_tokens": 1, "return_token_ids": True,
                                            "add_generation_prompt": False})
    assert on["prompt_token_ids"] == tok.encode(tok.apply_chat_template(msgs), add_special_tokens=False)
    assert off["prompt_token_ids"] == tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=False),
                                                 add_special_tokens=False)
    user = tok.token_to_id("<｜User｜>")
    only = {"prompt": PROMPT, "max_tokens": 3, "allowed_token_ids": [user], "ignore_eos": True}
    assert post(srv, "/v1/completions", only)["choices"][0]["text"] == ""
    shown = post(srv, "/v1/completions", {**only, "skip_special_tokens": False})["choices"][0]
    assert shown["text"] == "<｜User｜>" * 3


def test_allowed_token_ids(srv, ref):
    _, tok = ref
    allowed = tok.encode(" x y z", add_special_tokens=False)
    r = post(srv, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 3, "ignore_eos": True,
                                      "allowed_token_ids": allowed, "return_token_ids": True})
    assert set(r["choices"][0]["token_ids"]) <= set(allowed)
    with client(srv) as c:
        assert c.post("/v1/completions", json={"prompt": "x", "allowed_token_ids": [10 ** 6]}).status_code == 400


def test_continuous_usage_stats(srv):
    sdk = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    for route in ("chat", "completions"):
        kw = dict(model="tiny", max_tokens=6, temperature=0, stream=True,
                  stream_options={"include_usage": True, "continuous_usage_stats": True})
        it = sdk.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **kw) if route == "chat" \
            else sdk.completions.create(prompt=PROMPT, **kw)
        chunks = list(it)
        used = [c.usage.completion_tokens for c in chunks]
        assert all(c.usage is not None for c in chunks) and used == sorted(used)
        assert used[-1] == chunks[-1].usage.total_tokens - chunks[-1].usage.prompt_tokens and used[-1] >= 1
        plain = list(sdk.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}))
        assert all(c.usage is None for c in plain[:-1]) and plain[-1].usage is not None


def test_best_of(srv):
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 11, "logprobs": 0}
    every = post(srv, "/v1/completions", {**body, "n": 4})["choices"]
    total = {c["text"]: sum(c["logprobs"]["token_logprobs"]) for c in every}
    best = post(srv, "/v1/completions", {**body, "n": 2, "best_of": 4})["choices"]
    assert [c["text"] for c in best] == sorted(total, key=lambda t: -total[t])[:2]
    with client(srv) as c:
        r = c.post("/v1/completions", json={**body, "n": 3, "best_of": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
        assert c.post("/v1/completions", json={**body, "best_of": 2, "stream": True}).status_code == 400


def test_top_logprobs_needs_logprobs_and_model_by_id(srv):
    with client(srv) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
        card = c.get("/v1/models/tiny").json()
        assert card["id"] == "tiny" and card["object"] == "model" and card["max_model_len"] == 256
        r = c.get("/v1/models/other")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert openai.OpenAI(base_url=srv.url + "/v1", api_key="x").models.retrieve("tiny").id == "tiny"


def _offsets_match(tok, text: str, lp: dict, ids: list[int]) -> None:
    """Each token's offset is where its text begins in `text` (special tokens: empty, at the next character)."""
    for k, (tid, pos) in enumerate(zip(ids, lp["text_offset"])):
        piece = "" if tok.is_special(tid) else tok.decode([tid])
        if "\ufffd" not in piece:
            assert text[pos:pos + len(piece)] == piece, (k, pos, piece)
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][-1] <= len(text)


def test_text_offsets_point_into_the_text_echoed_and_streamed(srv, ref):
    _, tok = ref
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 1, "echo": True, "return_token_ids": True}
    ch = post(srv, "/v1/completions", body)["choices"][0]
    assert ch["text"].startswith(PROMPT) and ch["logprobs"]["text_offset"][:2] == [0, 0]  # BOS is not in the text
    _offsets_match(tok, ch["text"], ch["logprobs"], ch["prompt_token_ids"] + ch["token_ids"])
    with client(srv) as c, c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        parts = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(p["choices"][0]["text"] for p in parts if p["choices"])
    offsets = [o for p in parts if p["choices"] and p["choices"][0]["logprobs"] for o in p["choices"][0]["logprobs"]["text_offset"]]
    assert text == ch["text"] and offsets == ch["logprobs"]["text_offset"]  # no restart at 0 per chunk


def test_cache_salt_separates_prefix_cache(srv):
    bm = srv.engine.block_manager
    body = {"prompt": "x " * 60, "max_tokens": 1}
    post(srv, "/v1/completions", {**body, "cache_salt": "tenant-a"})
    hits = bm.prefix_hits
    post(srv, "/v1/completions", {**body, "cache_salt": "tenant-b"})
    assert bm.prefix_hits == hits  # another salt shares nothing
    post(srv, "/v1/completions", {**body, "cache_salt": "tenant-a"})
    assert bm.prefix_hits > hits


@pytest.mark.parametrize("route,extra", [
    ("/v1/chat/completions", {"use_beam_search": True}), ("/v1/completions", {"length_penalty": 0.5}),
    ("/v1/chat/completions", {"reasoning_effort": "high"}), ("/v1/chat/completions", {"functions": [{"name": "f"}]}),
    ("/v1/chat/completions", {"store": True}), ("/v1/chat/completions", {"chat_template": "{{ x }}"}),
    ("/v1/chat/completions", {"echo": True}), ("/v1/completions", {"priority": 1}),
    ("/v1/completions", {"prompt_embeds": "AAAA"}), ("/v1/chat/completions", {"modalities": ["audio"]}),
    ("/v1/completions", {"max_tokens": 0}), ("/v1/chat/completions", {"moderation": {"model": "m"}}),
])
def test_known_unsupported_fields_are_refused(srv, route, extra):
    body = {"messages": [{"role": "user", "content": "x"}]} if "chat" in route else {"prompt": "x"}
    with client(srv) as c:
        r = c.post(route, json={**body, "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] in {*extra, "max_tokens", "modalities.0"}


def test_unknown_and_informational_fields_are_accepted(srv):
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "frobnicate": {"a": 1},
            "metadata": {"k": "v"}, "service_tier": "auto", "prompt_cache_key": "k", "safety_identifier": "u1",
            "prompt_cache_retention": "24h", "prompt_cache_options": {"mode": "implicit"},
            "store": False, "modalities": ["text"], "use_beam_search": False, "length_penalty": 1.0,
            "spaces_between_special_tokens": False}
    with client(srv) as c:
        assert c.post("/v1/chat/completions", json=body).status_code == 200
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "frobnicate": 1}).status_code == 200


def test_request_id_names_the_response(srv):
    r = post(srv, "/v1/completions", {"prompt": "x", "max_tokens": 1, "request_id": "my-req-1"})
    assert r["id"] == "my-req-1"
    with client(srv) as c:
        assert c.post("/v1/completions", json={"prompt": "x", "request_id": "bad id"}).status_code == 400
