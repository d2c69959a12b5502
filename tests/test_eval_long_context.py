"""`dsv3 eval needle` and `dsv3 eval long-ppl`: prompts of the asked length with the needle where it was put,
scoring that tells a reader from a guesser, the heatmap and curve files, and chunked scoring of long texts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3.eval import long_ppl, needle
from dsv3.eval.backends import Backend, InProcessBackend
from dsv3.io.tokenizer import Tokenizer
from tiny_model import make_tiny_model_dir

SRC = str(Path(__file__).parents[1] / "src")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("m"), max_position_embeddings=4096)


class Reader(Backend):
    """Answers with the key written in the prompt (a model that retrieves perfectly), or a fixed guess."""

    name = "reader"

    def __init__(self, cheat: bool):
        self.cheat, self.prompts = cheat, []

    def generate(self, prompts, *, stop, max_tokens, temperature=0.0, top_p=1.0, n=1, seed=None, desc=""):
        self.prompts += list(prompts)
        out = []
        for p in prompts:
            m = re.search(r'PASSKEY = "(\d+)"', p) or re.search(r"pass key is (\d+)", p)
            out.append([m.group(1) + '"' if self.cheat else "12345"])
        return out

    def loglikelihood(self, requests, desc=""):
        raise NotImplementedError

    def rolling_loglikelihood(self, texts, window, stride, desc=""):
        raise NotImplementedError


def test_needle_prompts_have_the_length_and_depth_asked(model_dir):
    tok = Tokenizer.from_dir(model_dir)
    reader = Reader(cheat=True)
    res = needle.evaluate(reader, tok, [300, 900], [0.0, 0.5, 1.0], trials=2)
    assert res.metrics["acc"].value == 1.0 and res.metrics["acc"].n == 12
    guess = needle.evaluate(Reader(cheat=False), tok, [300, 900], [0.0, 0.5, 1.0], trials=2)
    assert guess.metrics["acc"].value < 0.2  # a fixed guess is not retrieval
    for prompt, cell in zip(reader.prompts, res.samples):
        n = len(tok.encode(prompt)) + 1
        assert abs(n - cell["length"]) <= 0.03 * cell["length"] + 4, (n, cell["length"])
        at = prompt.index("PASSKEY = ")
        line = prompt[at:prompt.index("\n", at) + 1]
        hay = n - len(tok.encode(line)) - len(tok.encode(needle.FORMATS["code"][1])) - 1
        depth = len(tok.encode(prompt[:at])) / hay  # depth = share of the haystack before the needle
        assert abs(depth - cell["depth"]) < 0.05, (depth, cell["depth"])
        assert at == 0 or prompt[at - 1] == "\n"  # the needle is a line of its own
        assert prompt.endswith('assert PASSKEY == "')
    keys = {c["key"] for c in res.samples}
    assert len(keys) >= 10 and all(len(k) == needle.KEY_DIGITS for k in keys)


def test_needle_and_long_ppl_run_in_process_and_write_plots(model_dir, tmp_path):
    backend = InProcessBackend(model_dir, max_model_len=1100, max_length=1100)
    tok = backend.tok
    res = needle.evaluate(backend, tok, [256, 1024], [0.0, 1.0], trials=1, plot=tmp_path / "n.png")
    assert (tmp_path / "n.png").stat().st_size > 1000 and {c["length"] for c in res.samples} == {256, 1024}
    assert all(isinstance(c["answer"], str) for c in res.samples)
    doc = tmp_path / "doc.py"
    doc.write_text(open(needle.__file__).read())
    lp = long_ppl.evaluate(backend, [doc], [64, 256, 1024], plot=tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000
    bpb = [lp.groups[f"context/{c}"]["bits_per_byte"].value for c in (64, 256, 1024)]
    assert all(b > 0 for b in bpb) and lp.metrics["ratio_1024_to_64"].value == pytest.approx(bpb[2] / bpb[0])


def test_long_sequences_are_scored_in_chunks_exactly(model_dir):
    """LLM.score runs a long sequence chunk by chunk over a cache: the same log-probs as one full forward."""
    from dsv3 import LLM

    llm = LLM(str(model_dir), dtype="fp32")
    ids = torch.randint(3, llm.model.config.vocab_size, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    whole = llm.score([ids])[0]
    llm.SCORE_CHUNK = 64
    chunked = llm.score([ids])[0]
    assert len(chunked.logprobs) == len(whole.logprobs) == 299
    assert max(abs(a - b) for a, b in zip(chunked.logprobs, whole.logprobs)) < 1e-4
    assert chunked.is_greedy == whole.is_greedy


def test_cli_needle_and_long_ppl(model_dir, tmp_path):
    env = {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}
    out = tmp_path / "needle.json"
    r = subprocess.run([sys.executable, "-m", "dsv3", "eval", "needle", "--model", str(model_dir), "--lengths", "200,400",
                        "--depths", "0,0.5", "--trials", "1", "-o", str(out)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["task"] == "needle" and out.with_suffix(".png").exists()
    assert "length/200" in r.stdout and "plot written to" in r.stdout
    for bad, msg in ((["--depths", "1.5"], "depths"), (["--lengths", "x"], "lengths"), (["--trials", "0"], "trials")):
        r = subprocess.run([sys.executable, "-m", "dsv3", "eval", "needle", "--model", str(model_dir), *bad],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
