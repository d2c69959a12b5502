"""`dsv3.LLM`, the single-request generator, and the `dsv3 generate` / `dsv3 chat` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3 import LLM, SamplingParams
from dsv3.errors import DSV3Error
from tiny_model import make_tiny_model_dir

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, dtype="fp32")


@torch.no_grad()
def test_greedy_equals_full_recompute(llm):
    """The cached (absorbed-MLA) decode picks the same tokens as re-running the whole sequence each step."""
    prompt = llm.get_tokenizer().encode("def add(a, b):\n    return")
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    seq = list(prompt)
    for _ in range(24):
        seq.append(int(llm.model(torch.tensor([seq]))[0, -1].argmax()))
    assert out.outputs[0].token_ids == seq[len(prompt):]
    assert out.outputs[0].finish_reason == "length"
    assert out.outputs[0].text == llm.get_tokenizer().decode(out.outputs[0].token_ids)


def test_seeded_sampling_is_reproducible_and_n_samples_differ(llm):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=11, n=3, ignore_eos=True)
    a = [o.token_ids for o in llm.generate("import os", params)[0].outputs]
    b = [o.token_ids for o in llm.generate("import os", params)[0].outputs]
    assert a == b
    assert len({tuple(x) for x in a}) > 1


def test_stop_string_across_tokens_is_cut(llm):
    base = llm.generate("class A:", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0].outputs[0]
    text = base.text
    stop = text[5:9]  # most likely spans a token boundary in a 512-token vocabulary
    assert len(stop) == 4
    out = llm.generate("class A:", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.find(stop)]


@pytest.mark.parametrize("kwargs", [dict(max_tokens=0), dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1),
                                    dict(n=1000), dict(stop=[3]), dict(stop=5)])
def test_invalid_sampling_params_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_prompt_too_long_is_rejected(model_dir):
    small = LLM(model_dir, dtype="fp32", max_model_len=8)
    with pytest.raises(DSV3Error, match="max_model_len"):
        small.generate({"prompt_token_ids": list(range(3, 20))}, SamplingParams(max_tokens=4))


def test_chat_and_score(llm):
    out = llm.chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], SamplingParams(max_tokens=5, temperature=0))
    ids = out[0].prompt_token_ids
    tok = llm.get_tokenizer()
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    seq = ids + out[0].outputs[0].token_ids
    score = llm.score([seq])[0]
    assert len(score.logprobs) == len(seq) - 1
    assert all(score.is_greedy[len(ids) - 1:])  # greedy continuation is the argmax at every step
    assert all(lp <= 0 for lp in score.logprobs)


def dsv3(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "dsv3", *args], input=stdin, capture_output=True, text=True, env=env, timeout=120)


def test_cli_generate_prints_only_the_completion(model_dir, llm):
    r = dsv3("generate", "--model", str(model_dir), "--dtype", "fp32", "--max-tokens", "12", "def main():")
    assert r.returncode == 0, r.stderr
    expected = llm.generate("def main():", SamplingParams(max_tokens=12, temperature=0))[0].outputs[0].text
    assert r.stdout == expected + "\n"


def test_cli_chat_multi_turn_reset_exit(model_dir):
    r = dsv3("chat", "--model", str(model_dir), "--max-tokens", "6", "--stop", "\n", stdin="hello\n/reset\nhi there\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 2 and "(conversation cleared)" in r.stderr


def test_cli_errors_are_one_line_exit_2(model_dir, tmp_path):
    (tmp_path / "noconfig").mkdir()
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    cfg = json.loads((model_dir / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    shape = tmp_path / "shape"
    shape.mkdir()
    for f in model_dir.iterdir():
        (shape / f.name).write_bytes(f.read_bytes())
    (shape / "config.json").write_text(json.dumps({**cfg, "kv_lora_rank": cfg["kv_lora_rank"] * 2}))
    cases = [
        (["generate", "--model", str(tmp_path / "nope"), "x"], "does not exist"),
        (["generate", "--model", str(tmp_path / "noconfig"), "x"], "config.json"),
        (["generate", "--model", str(unknown), "x"], "model_type"),
        (["generate", "--model", str(shape), "x"], "has shape"),
        (["generate", "--model", str(model_dir), "--max-tokens", "0", "x"], "max-tokens"),
        (["generate", "--model", str(model_dir), "--dtype", "fp7", "x"], "dtype"),
        (["generate", "--model", str(model_dir), "--temperature", "-1", "x"], "temperature"),
    ]
    for args, needle in cases:
        r = dsv3(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, (args, r.stderr)
        assert r.stdout == ""
