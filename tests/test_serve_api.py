"""The OpenAI routes against the `openai` SDK, checked against the single-request generator."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dsv3.engine.sampling import SamplingParams
from serve_harness import client, model_dir, oracle, ref, serve, srv, tiny_model_dir  # noqa: F401 (fixtures)




@pytest.fixture(scope="module")
def sdk(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def chat_ids(tok, content):
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": content}]), add_special_tokens=False)


def test_chat_matches_single_request_generator(sdk, ref):
    gen, tok = ref
    r = sdk.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "def fib(n):"}],
                                    max_tokens=12, temperature=0)
    want = gen.complete(chat_ids(tok, "def fib(n):"), SamplingParams(max_tokens=12, temperature=0))
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(chat_ids(tok, "def fib(n):"))
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.object == "chat.completion" and r.model == "tiny"


def test_completions_prompt_forms_and_echo(sdk, ref):
    gen, tok = ref
    p = "import os\n"
    want = gen.complete(tok.encode(p), SamplingParams(max_tokens=6, temperature=0))
    r = sdk.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0)
    assert r.choices[0].text == want.text
    r = sdk.completions.create(model="tiny", prompt=tok.encode(p), max_tokens=6, temperature=0)
    assert r.choices[0].text == want.text
    r = sdk.completions.create(model="tiny", prompt=[p, "class A:"], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == want.text
    other = gen.complete(tok.encode("class A:"), SamplingParams(max_tokens=6, temperature=0))
    assert r.choices[2].text == other.text
    r = sdk.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0, echo=True)
    assert r.choices[0].text == tok.decode(tok.encode(p)) + want.text


def test_fim_suffix_builds_prefix_suffix_middle_prompt(sdk, ref, srv):
    gen, tok = ref
    fim = tok.fim_tokens
    ids = [tok.bos_token_id, fim.prefix, *tok.encode("def f(", add_special_tokens=False), fim.suffix,
           *tok.encode("    return x", add_special_tokens=False), fim.middle]
    want = gen.complete(ids, SamplingParams(max_tokens=5, temperature=0))
    r = sdk.completions.create(model="tiny", prompt="def f(", suffix="    return x", max_tokens=5, temperature=0)
    assert r.choices[0].text == want.text and r.usage.prompt_tokens == len(ids)


def test_streaming_chat_with_usage(sdk, srv):
    msgs = [{"role": "user", "content": "for i in"}]
    full = sdk.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    chunks = list(sdk.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert all(c.choices[0].delta is not None for c in chunks[:-1])
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason] == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    with client(srv) as c:  # the raw wire format: data lines, then [DONE]
        raw = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 3, "stream": True}).text
    events = [e for e in raw.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])


def test_completions_stream_matches_whole(sdk):
    whole = sdk.completions.create(model="tiny", prompt="x = [", max_tokens=8, temperature=0, n=2)
    parts = {0: "", 1: ""}
    for ch in sdk.completions.create(model="tiny", prompt="x = [", max_tokens=8, temperature=0, n=2, stream=True):
        for c in ch.choices:
            parts[c.index] += c.text
    assert parts == {c.index: c.text for c in whole.choices}


def test_seed_reproducible_and_n(sdk):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=1.0, n=3)
    a = sdk.chat.completions.create(seed=7, **kw)
    b = sdk.chat.completions.create(seed=7, **kw)
    c = sdk.chat.completions.create(seed=8, **kw)
    texts = lambda r: [ch.message.content for ch in r.choices]  # noqa: E731
    assert len(a.choices) == 3 and texts(a) == texts(b)
    assert texts(a) != texts(c)


def test_stop_string_cuts_output(sdk):
    base = sdk.completions.create(model="tiny", prompt="def g", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    text = base.choices[0].text
    stop = text[3:5]
    assert stop.strip(), "the tiny model produced whitespace; pick another prompt"
    r = sdk.completions.create(model="tiny", prompt="def g", max_tokens=12, temperature=0, stop=[stop],
                               extra_body={"ignore_eos": True})
    assert r.choices[0].text == text[: text.find(stop)] and r.choices[0].finish_reason == "stop"


def test_async_client_concurrent_requests(srv, ref):
    gen, tok = ref
    prompts = ["a", "import", "while True:", "return"]

    async def main():
        aclient = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        rs = await asyncio.gather(*[aclient.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0)
                                    for p in prompts])
        await aclient.close()
        return rs

    rs = asyncio.run(main())
    for p, r in zip(prompts, rs):
        assert r.choices[0].text == gen.complete(tok.encode(p), SamplingParams(max_tokens=6, temperature=0)).text


def test_bad_input_is_4xx_with_openai_error(sdk, srv):
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model="tiny", messages=msgs, max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="context length"):
        sdk.chat.completions.create(model="tiny", messages=msgs, max_tokens=10 ** 9)
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="gpt-4", messages=msgs)
    with pytest.raises(openai.BadRequestError, match="max_model_len"):
        sdk.completions.create(model="tiny", prompt=list(range(10, 300)), max_tokens=1)
    bad = [(b"{not json", "application/json"), (b'{"messages": "hi"}', "application/json"),
           (b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', "application/json"),
           (b'{"messages": [{"role": "wizard", "content": "x"}]}', "application/json"),
           (b'{"messages": []}', "application/json"), (b"[1, 2]", "application/json"), (b"", "text/plain"),
           (b'{"prompt": "x", "logit_bias": {"99999": 5}}', "application/json"),
           (b'{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", '
            b'"json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}', "application/json")]
    with client(srv) as c:
        for body, ctype in bad:
            route = "/v1/completions" if b'"prompt"' in body else "/v1/chat/completions"
            r = c.post(route, content=body, headers={"content-type": ctype})
            assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
        r = c.post("/v1/chat/completions", content=b"{oops", headers={"content-type": "application/json"})
        assert "not valid JSON" in r.json()["error"]["message"]
        assert c.get("/v1/nothing").status_code == 404


def test_tokenize_detokenize_models_docs_health(srv, ref):
    _, tok = ref
    with client(srv) as c:
        r = c.post("/tokenize", json={"prompt": "def main():"}).json()
        assert r["tokens"] == tok.encode("def main():") and r["count"] == len(r["tokens"])
        assert c.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == tok.decode(r["tokens"])
        r = c.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
        assert r["tokens"] == chat_ids(tok, "hi")
        assert c.post("/detokenize", json={"tokens": [10 ** 6]}).status_code == 400
        assert c.get("/health").status_code == 200
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny"]
        assert "swagger" in c.get("/docs").text.lower()
        paths = c.get("/openapi.json").json()["paths"]
        assert {"/v1/chat/completions", "/v1/completions", "/tokenize"} <= set(paths)


def test_metrics_parse_and_count(srv, sdk):
    sdk.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0)
    with client(srv) as c:
        fams = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
    for name in ("dsv3:num_requests_running", "dsv3:num_requests_waiting", "dsv3:kv_cache_usage_perc",
                 "dsv3:prefix_cache_queries", "dsv3:prefix_cache_hits", "dsv3:prompt_tokens", "dsv3:generation_tokens",
                 "dsv3:time_to_first_token_seconds", "dsv3:e2e_request_latency_seconds", "dsv3:num_preemptions",
                 "dsv3:inter_token_latency_seconds", "dsv3:request"):
        assert name in fams, name
    gen = [s.value for s in fams["dsv3:generation_tokens"].samples][0]
    assert gen == srv.engine.stats["generation_tokens"] > 0
    ok = [s for s in fams["dsv3:request"].samples if s.labels.get("route") == "/v1/completions" and s.labels.get("status") == "200"]
    assert ok and ok[0].value >= 1


def test_client_disconnect_aborts_and_frees_blocks(model_dir):
    # The tiny model decodes a few thousand tokens/s, so the request must be long enough that noticing the
    # disconnect clearly beats finishing it: 1,000 tokens in a server of its own with room for them.
    max_tokens = 1000
    with serve(model_dir, max_model_len=1024) as srv:
        eng = srv.engine
        before = eng.stats["generation_tokens"]
        body = {"prompt": "x", "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            with c.stream("POST", "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        break
        deadline = time.monotonic() + 10
        while eng.has_unfinished_requests() or eng.requests:
            assert time.monotonic() < deadline, "the request was not aborted"
            time.sleep(0.02)
        assert eng.stats["generation_tokens"] - before < max_tokens
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_logprobs_match_a_full_forward_pass(sdk, ref):
    import torch

    gen, tok = ref
    p = "def main():"
    ids = tok.encode(p)
    r = sdk.completions.create(model="tiny", prompt=p, max_tokens=5, temperature=0, logprobs=3, echo=True)
    lp_obj = r.choices[0].logprobs
    out_ids = ids + gen.complete(ids, SamplingParams(max_tokens=5, temperature=0)).token_ids
    with torch.no_grad():
        lp = gen.model(torch.tensor([out_ids])).float().log_softmax(-1)[0]
    want = [None] + [lp[i - 1, t].item() for i, t in enumerate(out_ids) if i > 0]
    got = lp_obj.token_logprobs
    assert len(got) == len(out_ids) and got[0] is None
    assert got[1:] == pytest.approx(want[1:], abs=1e-4)
    for top, i in zip(lp_obj.top_logprobs[len(ids):], range(len(ids), len(out_ids))):
        assert len(top) == 3 and max(top.values()) == pytest.approx(lp[i - 1].max().item(), abs=1e-4)
    c = sdk.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                    temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    for e in content:  # greedy: the chosen token is the most likely one
        assert len(e.top_logprobs) == 2 and e.logprob == pytest.approx(e.top_logprobs[0].logprob)


def test_truncate_prompt_tokens_keeps_the_last_tokens(srv, ref):
    """vLLM's `truncate_prompt_tokens`: a prompt longer than the context runs on its last k tokens."""
    gen, tok = ref
    long_ids = [5 + (i * 7) % 200 for i in range(300)]  # longer than the test server's 256-token context
    with client(srv) as c:
        assert c.post("/v1/completions", json={"prompt": long_ids, "max_tokens": 4}).status_code == 400
        r = c.post("/v1/completions", json={"prompt": long_ids, "max_tokens": 6, "temperature": 0,
                                            "truncate_prompt_tokens": 100})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 100
        want = gen.complete(long_ids[-100:], SamplingParams(max_tokens=6, temperature=0))
        assert r.json()["choices"][0]["text"] == want.text
        r = c.post("/v1/completions", json={"prompt": long_ids, "max_tokens": 1, "truncate_prompt_tokens": -1})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == srv.engine.max_model_len - 1
        text = "def f(x):\n    return x\n" * 80
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}], "max_tokens": 3,
                                                 "truncate_prompt_tokens": 50})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 50
        assert c.post("/v1/completions", json={"prompt": "x", "truncate_prompt_tokens": -2}).status_code == 400
