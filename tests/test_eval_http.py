"""The OpenAI-compatible HTTP backend against a toy server whose log-probabilities are known exactly."""

from __future__ import annotations

import socket
import time

import pytest

from dsv3.eval import gsm8k, mmlu, perplexity
from dsv3.eval.http_backend import NoPromptLogprobsError, OpenAIBackend, ServerError, api_root
from test_eval_fakes import FakeOpenAIServer, ScriptedBackend, toy_logprob, toy_text_logprob, toy_tokens
from test_eval_gsm8k import TEST, reply, write_jsonl
from test_eval_mmlu import make_mmlu


def backend(server: FakeOpenAIServer, **kw) -> OpenAIBackend:
    kw.setdefault("backoff", 0.01)
    return OpenAIBackend(server.url, **kw)


def test_api_root_normalisation():
    assert api_root("http://h:1") == api_root("http://h:1/v1/") == "http://h:1/v1"
    with pytest.raises(ServerError, match="not an http"):
        api_root("h:1")


def test_default_model_name_and_api_key():
    with FakeOpenAIServer(api_key="sekret") as server:
        b = backend(server, api_key="sekret")
        assert b.name == "toy-model"
        assert server.requests[0][0] == "/v1/models"
        assert server.requests[0][2]["Authorization"] == "Bearer sekret"
        with pytest.raises(ServerError, match=r"/v1/models answered HTTP 401: Invalid API key"):
            backend(server, api_key="wrong")
        assert backend(server, api_key="sekret", model="other").name == "other"


def test_loglikelihood_sums_exactly_the_continuation_tokens():
    with FakeOpenAIServer() as server:
        b = backend(server)
        reqs = [("The cat sat on the", " mat today"), ("Answer:", " B"), ("x y ", "z")]
        got = b.loglikelihood(reqs)
        whole = "The cat sat on the mat today"
        expected0 = toy_logprob("The cat sat on the", " mat") + toy_logprob("The cat sat on the mat", " today")
        assert got[0].logprob == pytest.approx(expected0)
        assert got[2].logprob == pytest.approx(toy_logprob("x y", " z"))  # trailing space moved to the continuation
        payload = server.requests[-1][1]
        assert payload["echo"] is True and payload["logprobs"] == 1 and payload["max_tokens"] == 0
        assert whole in {p[1]["prompt"] for p in server.requests if p[1]}


def test_mmlu_over_http_gives_same_choices_as_in_process(tmp_path):
    root = make_mmlu(tmp_path)
    local = mmlu.evaluate(ScriptedBackend(), root, num_fewshot=5)
    with FakeOpenAIServer() as server:
        remote = mmlu.evaluate(backend(server, concurrency=4), root, num_fewshot=5)
    assert remote.metrics["acc"].value == pytest.approx(4 / 6)
    assert [s["pred"] for s in remote.samples] == [s["pred"] for s in local.samples]
    for a, b in zip(remote.samples, local.samples):
        assert a["logprobs"] == pytest.approx(b["logprobs"])


@pytest.mark.parametrize("mode", ["no_logprobs", "gen_only"])
def test_servers_without_prompt_logprobs_are_refused(tmp_path, mode):
    with FakeOpenAIServer(mode=mode) as server:
        with pytest.raises(NoPromptLogprobsError, match=r"returned no log-probabilities for the prompt tokens"):
            mmlu.evaluate(backend(server), make_mmlu(tmp_path), num_fewshot=0)


def test_server_refusing_max_tokens_zero_falls_back_to_one():
    with FakeOpenAIServer(mode="reject_max0", generator=lambda p: " extra words") as server:
        b = backend(server)
        got = b.loglikelihood([("one two", " three")])
        assert got[0].logprob == pytest.approx(toy_logprob("one two", " three"))  # generated token not counted
        assert b.echo_max_tokens == 1


def test_retries_on_429_and_5xx_then_gives_up():
    with FakeOpenAIServer() as server:
        b = backend(server, max_retries=3)
        server.fail_429 = 2
        n_before = len(server.requests)
        assert b.loglikelihood([("a b", " c")])[0].logprob == pytest.approx(toy_logprob("a b", " c"))
        assert len(server.requests) - n_before == 3
        server.fail_500 = 10
        with pytest.raises(ServerError, match=r"/v1/completions answered HTTP 500: boom"):
            b.loglikelihood([("a b", " c")])


def test_timeouts_are_retried():
    with FakeOpenAIServer() as server:
        b = backend(server, timeout=0.3, max_retries=2)
        server.stall = 1
        assert b.loglikelihood([("a b", " c")])[0].logprob == pytest.approx(toy_logprob("a b", " c"))
        server.stall = 3
        with pytest.raises(ServerError, match=r"cannot reach the server at .*/v1/completions: timed out"):
            b.loglikelihood([("a b", " c")])


def test_unreachable_server_names_the_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        t = time.monotonic()
        with pytest.raises(ServerError, match=rf"cannot reach the server at http://127.0.0.1:{port}/v1/models"):
            OpenAIBackend(f"http://127.0.0.1:{port}")
        assert time.monotonic() - t < 5


def test_generation_completions_and_chat():
    many_stops = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
    with FakeOpenAIServer(generator=lambda p: " x = 1\nprint(x)\n") as server:
        b = backend(server)
        out = b.generate(["def f():"], stop=many_stops, max_tokens=50, temperature=0.0, n=2, seed=3)
        assert out == [[" x = 1", " x = 1"]]  # "\nprint" (5th stop) applied by the client
        payload = server.requests[-1][1]
        assert payload["stop"] == many_stops[:4] and payload["n"] == 2 and payload["seed"] == 3
        chat = backend(server, chat=True)
        assert chat.generate(["hi"], stop=[], max_tokens=5) == [[" x = 1\nprint(x)\n"]]
        assert server.requests[-1][0] == "/v1/chat/completions"
        assert server.requests[-1][1]["messages"] == [{"role": "user", "content": "hi"}]


def test_servers_ignoring_n_are_asked_again():
    with FakeOpenAIServer(mode="ignore_n", generator=lambda p: " 1") as server:
        out = backend(server).generate(["p"], stop=[], max_tokens=5, temperature=0.8, n=3, seed=10)
        assert out == [[" 1", " 1", " 1"]]
        assert [r[1]["seed"] for r in server.requests[-3:]] == [10, 11, 12]


def test_gsm8k_over_http(tmp_path):
    test = write_jsonl(tmp_path / "test.jsonl", TEST)
    with FakeOpenAIServer(generator=reply) as server:
        r = gsm8k.evaluate(backend(server), test, num_fewshot=0)
    assert r.metrics["strict_match"].value == 0.5 and r.metrics["flexible_extract"].value == 0.75


def test_perplexity_windows_count_every_token_once(tmp_path):
    words = " ".join(f"w{i % 17}x{i % 5}" for i in range(300))
    path = tmp_path / "text.txt"
    path.write_text(words)
    with FakeOpenAIServer() as server:
        b = backend(server)
        whole = b.rolling_loglikelihood([words], window=10_000, stride=10_000)[0]
        windowed = b.rolling_loglikelihood([words], window=20, stride=8)[0]  # 80-char windows, 32-char stride
        n_requests = len(server.requests)
        r = perplexity.evaluate(b, [path], window=20, stride=8)
    assert whole.tokens == len(toy_tokens(words)) - 1 and whole.logprob == pytest.approx(toy_text_logprob(words))
    assert windowed.tokens == whole.tokens  # every token scored exactly once across windows
    assert n_requests > 40
    assert r.metrics["bits_per_byte"].value == pytest.approx(-windowed.logprob / (len(words) * 0.6931471805599453))
