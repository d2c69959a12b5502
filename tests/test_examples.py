"""The runnable examples in examples/: LangChain and a LlamaIndex RAG against a dsv3 test server, the FastAPI service
on the Python API.

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


# A tiny fixed folder of code and code-shaped queries for it (the embeddings are a code model's pooled states).
CODE = {
    "stack.py": "class Stack:\n    \"\"\"A last-in, first-out stack.\"\"\"\n\n    def __init__(self):\n        self.items = []\n\n"
                "    def push(self, item):\n        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n",
    "files.py": "def read_text(path):\n    with open(path) as f:\n        return f.read()\n\n\n"
                "def write_text(path, text):\n    with open(path, 'w') as f:\n        f.write(text)\n",
    "config.py": "import json\n\n\ndef load_config(path):\n    with open(path) as f:\n        return json.load(f)\n",
    "fib.py": "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "pkg/primes.py": "def is_prime(n):\n    if n < 2:\n        return False\n    for d in range(2, int(n ** 0.5) + 1):\n"
                     "        if n % d == 0:\n            return False\n    return True\n",
}
QUERIES = {"class LifoQueue:\n    def push(self, x):\n        self.data.append(x)": "stack.py",
           "def load_file(name):\n    with open(name) as handle:\n        return handle.read()": "files.py",
           "def fib(k):\n    x, y = 0, 1\n    for i in range(k):\n        x, y = y, x + y\n    return x": "fib.py",
           "def prime(k):\n    for i in range(2, k):\n        if k % i == 0:\n            return False": "pkg/primes.py"}


@pytest.fixture(scope="module")
def chat_pair():
    """A server on the embedded default chat model (trained on Python, so its embeddings rank code) and its oracle."""
    from dsv3.io.paths import default_model_dir

    path = default_model_dir(chat=True)
    with serve(path, max_model_len=1024) as s:
        yield s, oracle(path, max_model_len=1024)


def test_llamaindex_rag_example_retrieves_the_relevant_file(chat_pair, tmp_path, capsys):
    """Each query's best chunk is the file it paraphrases; the answer is the served model's greedy reply to the
    prompt LlamaIndex built, which holds that file's code."""
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.event_handlers import BaseEventHandler
    from llama_index.core.instrumentation.events.llm import LLMChatStartEvent

    srv_, ref_ = chat_pair
    for name, text in CODE.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "notes.txt").write_text("def read_text(path): not code, and not indexed")

    class Prompts(BaseEventHandler):
        seen: list = []

        def handle(self, event, **kwargs):
            if isinstance(event, LLMChatStartEvent):
                self.seen.append([{"role": m.role.value, "content": m.content} for m in event.messages])

    ex, catcher, dispatcher = example("llamaindex_rag"), Prompts(), get_dispatcher()
    dispatcher.add_event_handler(catcher)
    try:
        for query, want in QUERIES.items():
            res = ex.run(query, tmp_path, srv_.url + "/v1", api_key="x", top_k=2, max_tokens=16, out=io.StringIO())
            assert res["model"] == "tiny" and [p for p, _ in res["sources"]][0] == want, (query, res["sources"])
            assert res["sources"][0][1] > res["sources"][1][1]
            messages = catcher.seen[-1]
            assert CODE[want] in messages[-1]["content"] and query in messages[-1]["content"]
            assert res["answer"] == greedy_chat(ref_, messages, 16)
        assert ex.main([list(QUERIES)[0], "--folder", str(tmp_path), "--base-url", srv_.url + "/v1", "--api-key", "x",
                        "--top-k", "1", "--max-tokens", "4"]) == 0
    finally:
        dispatcher.event_handlers.remove(catcher)
    printed = capsys.readouterr().out
    assert printed.startswith("answer: ") and printed.rstrip().splitlines()[-1].startswith("source: stack.py (")
    assert ex.main(["x", "--folder", str(tmp_path / "missing")]) == 2
