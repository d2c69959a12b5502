"""The runnable examples in examples/: LangChain against a dsv3 test server, the FastAPI service on the Python API.

Each is run as its `main()` (what `python examples/X.py ...` calls) or through its app factory, and its answers
are compared with the single-request generator on the same tiny model."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import sys
from pathlib import Path

import pytest

from dsv3.engine.sampling import SamplingParams
from serve_harness import model_dir, oracle, ref, serve, srv  # noqa: F401 (fixtures)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: pydantic resolves the request models' names through it
    spec.loader.exec_module(module)
    return module


def greedy_chat(ref, messages: list[dict], n: int) -> str:
    gen, tok = ref
    ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    return gen.complete(ids, SamplingParams(max_tokens=n, temperature=0)).text


def test_langchain_example_against_a_dsv3_server(srv, ref, capsys):
    ex = example("langchain_chat")
    question = "Write a function that reverses a string."
    assert ex.main([question, "--base-url", srv.url + "/v1", "--api-key", "x", "--max-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    res = ex.run(question, srv.url + "/v1", api_key="x", max_tokens=12, out=io.StringIO())
    want = greedy_chat(ref, [{"role": "system", "content": ex.SYSTEM}, {"role": "user", "content": question}], 12)
    assert res["model"] == "tiny"  # found through /v1/models
    assert res["answer"] == res["streamed"] == want
    assert printed.startswith(f"answer: {want}\nstreamed: {want}\nstructured: ")
    fn = res["structured"]  # decoded under the schema's grammar by the server (response_format json_schema)
    assert set(fn) == {"name", "arguments"} and re.fullmatch(r"[A-Za-z_]\w{0,23}", fn["name"], re.ASCII)
    assert isinstance(fn["arguments"], list) and len(fn["arguments"]) <= 4
    assert all(re.fullmatch(r"[A-Za-z_]\w{0,11}", a, re.ASCII) for a in fn["arguments"])
    assert json.loads(printed.split("structured: ")[1]) == fn


def test_fastapi_example_serves_the_python_api(model_dir, ref):
    from fastapi.testclient import TestClient

    ex = example("fastapi_service")
    gen, tok = ref
    with TestClient(ex.create_app(str(model_dir), dtype="fp32", max_model_len=256)) as client:
        assert client.get("/health").json() == {"status": "ok", "model": model_dir.name, "max_model_len": 256}
        r = client.post("/complete", json={"prompt": "def add(a, b):", "max_tokens": 8})
        want = gen.complete(tok.encode("def add(a, b):"), SamplingParams(max_tokens=8, temperature=0))
        assert r.status_code == 200 and r.json() == {"text": want.text, "finish_reason": want.finish_reason,
                                                     "completion_tokens": len(want.token_ids)}
        messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
        r = client.post("/chat", json={"messages": messages, "max_tokens": 8})
        assert r.status_code == 200 and r.json()["text"] == greedy_chat(ref, messages, 8)
        r = client.post("/complete", json={"prompt": "word " * 400})
        assert r.status_code == 400 and "max_model_len is 256" in r.json()["error"]
        assert client.post("/complete", json={"prompt": "x", "max_tokens": 0}).status_code == 422
