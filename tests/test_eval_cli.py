"""`dsv3 eval ...` end to end over HTTP: tables, results.json, charts, one-line errors with exit code 2."""

from __future__ import annotations

import json
import socket

import pytest

from dsv3.cli import main
from dsv3.eval import humaneval
from dsv3.eval.report import TaskResult
from test_eval_fakes import FakeOpenAIServer
from test_eval_gsm8k import TEST, reply, write_jsonl
from test_eval_mmlu import make_mmlu


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("dsv3: error: ")
    return lines[0]


def test_mmlu_table_and_results_file(tmp_path, capsys):
    out_file = tmp_path / "r.json"
    with FakeOpenAIServer() as server:
        code, out, _ = run(capsys, "eval", "mmlu", "--base-url", server.url, "--data", str(make_mmlu(tmp_path / "d")),
                           "--output", str(out_file))
    assert code == 0
    assert "acc *" in out and "0.6667" in out and "category/stem" in out
    saved = json.loads(out_file.read_text())
    assert saved["task"] == "mmlu" and saved["model"] == "toy-model" and saved["config"]["num_fewshot"] == 5
    assert saved["metrics"]["acc"]["value"] == pytest.approx(4 / 6) and saved["metrics"]["acc"]["n"] == 6
    assert TaskResult.load(out_file).metrics["acc_macro"].value == pytest.approx(0.625)


def test_humaneval_and_gsm8k_over_http(tmp_path, capsys):
    problems = {p["prompt"]: p for p in humaneval.load_problems()[:3]}
    with FakeOpenAIServer(generator=lambda prompt: problems[prompt]["canonical_solution"]) as server:
        code, out, _ = run(capsys, "eval", "humaneval", "--base-url", server.url, "--limit", "3",
                           "--output", str(tmp_path / "he.json"))
    assert code == 0 and "pass@1" in out
    he = json.loads((tmp_path / "he.json").read_text())
    assert he["metrics"]["pass@1"] == {"value": 1.0, "stderr": 0.0, "n": 3}
    assert he["config"]["sandbox"] and all(s["passed"] for s in he["samples"])
    test = write_jsonl(tmp_path / "test.jsonl", TEST)
    with FakeOpenAIServer(generator=reply) as server:
        code, out, _ = run(capsys, "eval", "gsm8k", "--base-url", server.url, "--data", str(test), "--num-fewshot", "0")
    assert code == 0 and "strict_match" in out and "0.5000" in out and "0.7500" in out


def test_compare_draws_a_png(tmp_path, capsys):
    paths = []
    for name, acc in (("base", 0.5), ("int4", 0.25)):
        from dsv3.eval.report import Metric
        r = TaskResult("mmlu", name, "InProcessBackend", {"acc": Metric(acc, 0.05, 100)}, "acc")
        r.save(tmp_path / f"{name}.json")
        paths.append(str(tmp_path / f"{name}.json"))
    chart = tmp_path / "chart.png"
    code, out, _ = run(capsys, "eval", "compare", *paths, "-o", str(chart))
    assert code == 0 and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5000
    assert "base" in out and "int4" in out
    code, _, err = run(capsys, "eval", "compare", *paths, "-o", str(chart), "--labels", "only-one")
    assert code == 2 and "--labels has 1 names for 2 results files" in one_line_error(err)
    (tmp_path / "junk.json").write_text("{}")
    code, _, err = run(capsys, "eval", "compare", str(tmp_path / "junk.json"), "-o", str(chart))
    assert code == 2 and "junk.json is not a dsv3 eval results.json" in one_line_error(err)


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DSV3_DEFAULT_MODEL", str(tmp_path / "no-default-model"))
    text = tmp_path / "x.txt"
    text.write_text("some text")
    root = make_mmlu(tmp_path / "d")
    with FakeOpenAIServer() as server:
        code, _, err = run(capsys, "eval", "mmlu", "--base-url", server.url, "--data", str(tmp_path / "missing"))
        assert code == 2 and "missing does not exist" in one_line_error(err)
        (root / "test" / "philosophy_test.csv").write_text("a,b,c\n")
        code, _, err = run(capsys, "eval", "mmlu", "--base-url", server.url, "--data", str(root))
        assert code == 2 and "philosophy_test.csv:1: expected 6 columns, found 3" in one_line_error(err)
    with FakeOpenAIServer(mode="no_logprobs") as server:
        code, _, err = run(capsys, "eval", "mmlu", "--base-url", server.url, "--data", str(make_mmlu(tmp_path / "e")))
        assert code == 2 and f"{server.url}/v1/completions returned no log-probabilities" in one_line_error(err)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        code, _, err = run(capsys, "eval", "perplexity", "--base-url", url, "--data", str(text))
        assert code == 2 and f"cannot reach the server at {url}/v1/models" in one_line_error(err)
    code, _, err = run(capsys, "eval", "gsm8k", "--base-url", url, "--data", str(tmp_path / "x.jsonl"))
    assert code == 2 and "GSM8K test file" in one_line_error(err) and "x.jsonl does not exist" in err
    code, _, err = run(capsys, "eval", "perplexity", "--model", str(tmp_path / "no-model"), "--data", str(text))
    assert code == 2 and "no-model is not a model directory" in one_line_error(err)
    code, _, err = run(capsys, "eval", "perplexity", "--data", str(text))
    assert code == 2 and "no-default-model" in one_line_error(err) and "--model DIR" in err
    code, _, err = run(capsys, "eval", "humaneval", "--base-url", "http://127.0.0.1:9", "--n", "2", "--k", "5")
    assert code == 2 and "--k 5 needs --n of at least 5" in one_line_error(err)
    with pytest.raises(SystemExit) as e:
        main(["eval", "nosuchtask"])
    assert e.value.code == 2
