"""bench/default_model_eval.py: each measurement against a hand-computed value, and a --quick run end to end
on a tiny random model and a tiny shard directory."""

from __future__ import annotations

import asyncio

import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from default_model import chat, completion, compression  # noqa: E402
from default_model_eval import main  # noqa: E402

from dsv3.data.builder import build, split_of  # noqa: E402
from dsv3.data.instructions import iter_functions  # noqa: E402
from dsv3.io.tokenizer import Tokenizer  # noqa: E402

MODULE = textwrap.dedent('''\
    """Module {k}."""
    import math


    def area_{k}(radius):
        """Return the area of a circle of the given radius."""
        value = math.pi * radius ** 2
        return value + {k}


    class Shape{k}:
        """A shape."""

        def scaled(self, factor):
            """Compute the shape scaled by a factor."""
            out = Shape{k}()
            out.size = self.size * factor
            return out
    ''')


def test_bits_per_byte_counts_every_token_once():
    # Scorer with a known answer: log p(t) = -0.01 * t, so -log2 p(doc) = sum(0.01 * t) / ln 2 whatever the windows.
    docs = [compression.Doc("stdlib/a.py", 10, [5, 7, 9, 11, 13, 1], b"0123456789"),
            compression.Doc("pkg/b.py", 4, [3, 4, 1], b"abcd")]
    score = lambda seq: [-0.01 * t for t in seq[1:]]  # noqa: E731
    for window, stride in ((2, 1), (4, 2), (5, 3), (64, 32)):
        res = compression.evaluate(score, docs, bos_id=0, window=window, stride=stride, progress=False)
        want = 0.01 * (5 + 7 + 9 + 11 + 13 + 1 + 3 + 4 + 1) / math.log(2) / 14
        assert res["all"]["model_bits_per_byte"] == pytest.approx(want, rel=1e-12)
        assert res["stdlib"]["model_bits_per_byte"] == pytest.approx(0.01 * 46 / math.log(2) / 10, rel=1e-12)
        assert res["all"]["tokens"] == 9 and res["stdlib"]["files"] == 1
    uniform = compression.evaluate(lambda seq: [-math.log(8192)] * (len(seq) - 1), docs, 0, 4, 2, progress=False)
    assert uniform["all"]["model_bits_per_byte"] == pytest.approx(9 * 13 / 14)  # 9 tokens of log2(8192) bits


def test_xz_size_is_the_command_line_tools():
    data = ("def f(x):\n    return x * 2\n" * 50).encode()
    docs = [compression.Doc("a", len(data), [1], data), compression.Doc("b", 3, [1], b"xyz")]
    res = compression.summarize(docs, [0.0, 0.0])
    assert res["xz_bits_per_byte_per_file"] == pytest.approx(8 * (compression.xz_size(data) + compression.xz_size(b"xyz"))
                                                             / (len(data) + 3))
    assert res["xz_bits_per_byte_concat"] == pytest.approx(8 * compression.xz_size(data + b"xyz") / (len(data) + 3))
    if shutil.which("xz") is None:
        pytest.skip("no xz binary to compare against")
    cli = subprocess.run(["xz", "-9e", "-c"], input=data, capture_output=True, check=True).stdout
    assert compression.xz_size(data) == len(cli)


def test_cut_function_stops_where_the_function_ends():
    prompt = 'def f(x):\n    """Double x."""'
    body = '\n    y = x * 2\n\n    return y\n'
    assert completion.cut_function(prompt, body + '\n\ndef g():\n    pass\n') == prompt + body + "\n\n"
    assert completion.cut_function(prompt, body + "# a comment at column 0\nx = 1\n") == prompt + body
    assert completion.cut_function(prompt, body) == prompt + body                 # ran out of tokens: all of it
    decorated = '@cache\ndef f(x):\n    """Double x."""'                           # column-0 prompt lines don't count
    assert completion.cut_function(decorated, "\n    return x\nprint(1)") == decorated + "\n    return x\n"
    assert completion.parse_function(prompt + body) == (True, True)
    assert completion.parse_function(prompt + "\n") == (True, False)             # docstring only: parses, no body
    assert completion.parse_function(prompt + "\n    y = (x +\n") == (False, False)


def test_function_prompt_is_what_a_user_types(tmp_path):
    (tmp_path / "m.py").write_text(MODULE.format(k=0))
    sites = completion.function_sites([("src/m.py", tmp_path / "m.py")], 10, seed=0)
    assert sorted(s.qualname for s in sites) == ["Shape0.scaled", "area_0"]
    method = next(s for s in sites if s.qualname == "Shape0.scaled")
    prompt = completion.function_prompt(method)
    assert prompt == 'def scaled(self, factor):\n    """Compute the shape scaled by a factor."""\n'
    rest = method.source[len(method.head):]
    assert completion.cut_function(prompt, rest + "\nclass Next:\n    pass\n") == method.source + "\n"
    assert completion.cut_function(prompt, "x = 1\n") == prompt  # the very first line may already end it


def test_functions_seen_in_train_files_are_left_out(tmp_path):
    (tmp_path / "m.py").write_text(MODULE.format(k=0))
    (tmp_path / "t.py").write_text("import os\n\n" + MODULE.format(k=0).split("class")[0])  # a train file repeating area_0
    seen = completion.seen_heads([("src/t.py", tmp_path / "t.py")])
    assert len(seen) == 1
    sites = completion.function_sites([("src/m.py", tmp_path / "m.py")], 10, seed=0, seen=seen)
    assert [s.qualname for s in sites] == ["Shape0.scaled"]
    recs = chat.heldout_instructions([("src/m.py", tmp_path / "m.py")], 10, seed=0, seen=seen)
    assert recs and all(r["meta"]["qualname"] != "area_0" for r in recs)
    assert any(r["meta"]["qualname"] == "area_0" for r in chat.heldout_instructions([("src/m.py", tmp_path / "m.py")], 10, seed=0))


def test_fim_items_and_prompt_layout(tmp_path):
    from dsv3.serve.completions import _prompts
    from dsv3.serve.protocol import CompletionRequest
    from tiny_tokenizer import make_tiny_tokenizer

    text = MODULE.format(k=3)
    (tmp_path / "m.py").write_text(text)
    items = completion.fim_items([("src/m.py", tmp_path / "m.py")], 50, seed=1)
    assert len(items) == 13  # the non-trivial lines: no blanks, comments or lines under 10 characters
    for it in items:
        assert it.prefix + it.middle + it.suffix == text
        assert it.middle == text.split("\n")[it.lineno - 1] and it.prefix.endswith("\n") == (it.lineno > 1)
    tok = Tokenizer.from_dir(make_tiny_tokenizer(tmp_path / "tok"))
    it = next(i for i in items if "out.size" in i.middle)
    pre, suf = completion.trim(tok, it.prefix, it.suffix, prefix_tokens=12, suffix_tokens=6)
    assert it.prefix.endswith(pre) and pre.endswith("out = Shape3()\n") and it.suffix.startswith(suf)
    assert len(tok.encode(pre, add_special_tokens=False)) <= 12 + 2  # whole lines within the budget (merges aside)
    ids = completion.fim_prompt_ids(tok, pre, suf)
    fim = tok.fim_tokens
    assert ids == ([tok.bos_token_id, fim.prefix] + tok.encode(pre, add_special_tokens=False) + [fim.suffix]
                   + tok.encode(suf, add_special_tokens=False) + [fim.middle])
    state = SimpleNamespace(tokenizer=tok, engine=SimpleNamespace(max_model_len=4096))
    server = asyncio.run(_prompts(state, CompletionRequest(prompt=pre, suffix=suf)))
    assert server == [ids]  # exactly what `/v1/completions` with a suffix sends to the model
    assert completion.first_line("x = 1  \ny = 2") == "x = 1"


def test_chat_answers_are_judged_on_their_code():
    assert chat.extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    assert chat.extract_code("```python\ndef f():\n    return 1\n") == "def f():\n    return 1\n"  # cut off
    assert chat.judge("def f(x):\n    return x\n", "f") == {"parses": True, "has_def": True, "ok": True, "right_name": True}
    assert chat.judge("```python\nx = 1\n```")["ok"] is False                                    # parses, no def
    assert chat.judge("Sure! Here is the function you asked for.")["parses"] is False


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tiny_model import make_tiny_model_dir

    root = tmp_path_factory.mktemp("eval")
    model = make_tiny_model_dir(root / "model")
    names, i = {"heldout": [], "train": []}, 0
    while len(names["heldout"]) < 2 or len(names["train"]) < 1:
        rel = f"src/{'stdlib' if i % 2 else 'pkg'}/m{i}.py"
        names[split_of(rel, 0.5)].append(rel)
        i += 1
    for k, rel in enumerate(names["heldout"] + names["train"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(MODULE.format(k=k))
    build([str(root / "src")], model, root / "shards", include=["*.py"], heldout_fraction=0.5, near_dup_threshold=1.0,
          progress=False)
    return root, model, names["heldout"]


def test_quick_run_end_to_end(setup, capsys):
    import torch

    root, model, held = setup
    out = root / "out"
    threads = torch.get_num_threads()
    assert main(["--model", str(model), "--chat-model", str(model), "--shards", str(root / "shards"),
                 "--inputs", str(root / "src"), "--out", str(out), "--quick", "--no-progress", "--window", "64",
                 "--stride", "16", "--max-model-len", "512", "--threads", "1"]) == 0
    torch.set_num_threads(threads)
    r = json.loads((out / "results.json").read_text())
    assert (out / "summary.png").stat().st_size > 10_000
    b = r["bits_per_byte"]
    texts = [(root / rel).read_bytes() for rel in sorted(held)]
    assert b["all"]["files"] == len(held) and b["all"]["bytes"] == sum(map(len, texts))
    assert b["all"]["xz_bits_per_byte_per_file"] == pytest.approx(
        8 * sum(compression.xz_size(t) for t in texts) / sum(map(len, texts)))
    assert b["tokenizer_matches_shards"] and b["token_count_mismatches"] == []  # our tokens are the shards' tokens
    assert b["all"]["model_bits_per_byte"] > 0.5  # a random model compresses badly
    f = r["function_completion"]
    # 2 functions per file, but `Shape{k}.scaled` has the same head in every file, train files included: left out
    assert f["n"] == min(6, len(held)) and 0 <= f["parse_rate_with_body"] <= f["parse_rate"] <= 1
    assert r["fim"]["n"] == 6 and 0 <= r["fim"]["exact_match"] <= 1
    assert 0 <= r["fim"]["prefix_only_exact_match"] <= 1 and 0 <= r["fim"]["prefix_only_edit_similarity"] <= 1
    assert r["fim"]["samples"] == 20 and 0 <= r["fim"]["pass_at_k_exact_match"] <= 1
    assert 0 <= r["fim"]["prefix_only_pass_at_k_exact_match"] <= 1
    for k in ("1", "2"):
        row = r["mtp"]["by_k"][k]
        assert row["identical_outputs"] and len(row["acceptance_per_position"]) == int(k) and row["drafted"][0] > 0
    assert r["infill_latency"]["engine"]["latency_s"]["n"] == 4 and r["infill_latency"]["http"]["completion_tokens"] == 20
    assert r["chat"]["n"] == 3 and 0 <= r["chat"]["parse_rate"] <= 1  # 1 unseen "write a function" record per file
    table = capsys.readouterr().out
    assert "bits/byte" in table and "xz -9e" in table and "MTP k=2" in table


def test_edit_similarity_is_one_minus_normalised_levenshtein():
    assert completion.edit_similarity("", "") == 1.0
    assert completion.edit_similarity("abc", "abc") == 1.0
    assert completion.edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)  # the textbook distance 3
    assert completion.edit_similarity("", "abcd") == 0.0
    assert completion.edit_similarity("return x", "return y") == pytest.approx(1 - 1 / 8)


def test_pass_at_k_counts_a_line_any_sample_writes_exactly():
    from default_model_eval import sampled_fim

    answers = [["x = 1\ny = 2", "x = 2", "x = 1  "], ["retur", "return  z", "return"]]
    seen = []

    def generate(ids, params, use_tqdm=False):
        seen.append(params)
        return [SimpleNamespace(outputs=[SimpleNamespace(text=t) for t in a]) for a in answers]

    rows = [{"expected": "x = 1"}, {"expected": "return z  "}]
    a = SimpleNamespace(fim_samples=3, fim_temperature=0.8, seed=7)
    r = sampled_fim(SimpleNamespace(generate=generate), [[1], [2]], rows, a, False)
    # line 1: "x = 1" (cut at the newline) and "x = 1  " (trailing spaces ignored); line 2: none ("return  z" differs)
    assert r["pass_at_k_exact_match"] == 0.5 and r["sampled_exact_share"] == pytest.approx(2 / 6)
    assert [row["samples_exact"] for row in rows] == [2, 0]
    assert seen[0].n == 3 and seen[0].temperature == 0.8 and seen[0].stop == ["\n"] and seen[0].seed == 7
    sampled_fim(SimpleNamespace(generate=generate), [[1], [2]], rows, a, False, "prefix_only_")
    assert [row["prefix_only_samples_exact"] for row in rows] == [2, 0]
