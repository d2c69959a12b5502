"""`dsv3 eval` in-process on a tiny random DeepSeek-V3, with HF transformers as the oracle.

The same model directory is loaded by `dsv3.LLM` (through `InProcessBackend`) and by
`transformers.AutoModelForCausalLM`; MMLU log-likelihoods and perplexity windows computed
by the eval code must equal sums of HF's log-softmax over the same tokens (<= 1e-4).
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from dsv3.cli import main
from dsv3.eval import gsm8k, humaneval, mmlu
from dsv3.eval.backends import InProcessBackend
from test_eval_fakes import ScriptedBackend
from test_eval_gsm8k import TEST, write_jsonl
from test_eval_mmlu import make_mmlu
from tiny_model import make_tiny_model_dir

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("eval-model"))


@pytest.fixture(scope="module")
def backend(model_dir):
    return InProcessBackend(model_dir, dtype="float32", batch_size=5)


@pytest.fixture(scope="module")
def hf(model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    return model, tok


def hf_encode(tok, text: str) -> list[int]:
    """HF's tokenizer with BOS written out: DeepSeek-V3 prompts start with BOS (tokenizer_config add_bos_token)."""
    return [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1 under the HF model."""
    logp = model(torch.tensor([ids])).logits.float().log_softmax(-1)[0, :-1]
    return logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_mmlu_loglikelihoods_match_hf(backend, hf, tmp_path):
    model, tok = hf
    root = make_mmlu(tmp_path)
    result = mmlu.evaluate(backend, root, num_fewshot=2)
    data = mmlu.load(root, 2)
    questions = [q for dev, test in data.values() for q in test]
    assert len(result.samples) == len(questions) == 6
    for q, sample in zip(questions, result.samples):
        ctx = mmlu.context(q, data[q.subject][0][:2])
        n_ctx = len(hf_encode(tok, ctx))  # HF's own tokenizer splits context and continuation
        expected = []
        for letter in "ABCD":
            whole = hf_encode(tok, ctx + " " + letter)
            expected.append(hf_logprobs(model, whole)[n_ctx - 1:].sum().item())
        assert sample["logprobs"] == pytest.approx(expected, abs=1e-4)
        assert sample["pred"] == "ABCD"[max(range(4), key=lambda j: expected[j])]
    # the scripted model's choices differ, so a random model is not accidentally scored like it
    assert [s["logprobs"] for s in result.samples] != [s["logprobs"] for s in
                                                       mmlu.evaluate(ScriptedBackend(), root, 2).samples]


def test_is_greedy_matches_hf_argmax(backend, hf):
    model, tok = hf
    ctx, cont = "def add(a, b):\n    return", " a + b\n"
    got = backend.loglikelihood([(ctx, cont)])[0]
    whole = hf_encode(tok, ctx + cont)
    n_ctx = len(hf_encode(tok, ctx))
    with torch.no_grad():
        argmax = model(torch.tensor([whole])).logits[0, :-1].argmax(-1)
    assert got.is_greedy == bool((argmax[n_ctx - 1:] == torch.tensor(whole[n_ctx:])).all())
    assert got.logprob == pytest.approx(hf_logprobs(model, whole)[n_ctx - 1:].sum().item(), abs=1e-4)


def test_rolling_loglikelihood_matches_hf(backend, hf):
    model, _ = hf
    text = "import os\n" * 3 + "def main():\n    print(os.getcwd())\n" * 6
    ids = backend.tok.encode(text, add_special_tokens=False)
    bos = backend.tok.bos_token_id
    full = backend.rolling_loglikelihood([text], window=4 * len(ids), stride=len(ids))[0]
    assert full.tokens == len(ids)
    assert full.logprob == pytest.approx(hf_logprobs(model, [bos] + ids).sum().item(), abs=1e-4)
    w, s = 24, 10
    windowed = backend.rolling_loglikelihood([text], window=w, stride=s)[0]
    expected = hf_logprobs(model, [bos] + ids[:w - 1]).sum().item()
    done = w - 1
    while done < len(ids):
        end = min(done + s, len(ids))
        expected += hf_logprobs(model, ids[end - w:end])[-(end - done):].sum().item()
        done = end
    assert windowed.tokens == len(ids) and windowed.logprob == pytest.approx(expected, abs=1e-4)
    assert abs(windowed.logprob - full.logprob) > 1e-3  # shorter context really changes the score


def test_generation_tasks_run_through_the_engine(backend, tmp_path):
    result = humaneval.evaluate(backend, limit=2, max_tokens=12, workers=2)
    assert result.metrics["pass@1"].n == 2 and 0.0 <= result.metrics["pass@1"].value <= 1.0
    for sample in result.samples:
        assert not any(stop in sample["completion"] for stop in humaneval.STOP)
        assert sample["result"] in ("passed", "timed out") or sample["result"].startswith("failed")
    r = gsm8k.evaluate(backend, write_jsonl(tmp_path / "t.jsonl", TEST), num_fewshot=0, max_tokens=8)
    assert r.metrics["strict_match"].n == 4 and all(isinstance(s["generation"], str) for s in r.samples)


def test_cli_perplexity_in_process(model_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("class A:\n    pass\n" * 20)
    assert main(["eval", "perplexity", "--model", str(model_dir), "--data", str(text), "--window", "32",
                 "-o", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "bits_per_byte *" in out and "file/t.txt" in out


@pytest.mark.skipif(importlib.util.find_spec("dsv3.commands.serve") is None, reason="`dsv3 serve` not available yet")
def test_mmlu_same_choices_over_http_against_dsv3_serve(model_dir, backend, tmp_path):
    """Acceptance: the log-likelihood path picks the same letters in-process and through `dsv3 serve`."""
    from dsv3.eval.http_backend import OpenAIBackend

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dsv3", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:  # /v1/models answers while the model is still loading; /health turns 200 once it is ready
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                remote = OpenAIBackend(f"http://127.0.0.1:{port}", max_retries=0)
                break
            except Exception:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "dsv3 serve did not come up"
                time.sleep(0.5)
        root = make_mmlu(tmp_path)
        local = mmlu.evaluate(backend, root, num_fewshot=1)
        served = mmlu.evaluate(remote, root, num_fewshot=1)
        assert [s["pred"] for s in served.samples] == [s["pred"] for s in local.samples]
        for a, b in zip(served.samples, local.samples):
            assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-3)
    finally:
        proc.terminate()
        proc.wait(10)
