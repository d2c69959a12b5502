"""MMLU on fixture files in the original layout: prompt format, scripted scores, bad data."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from dsv3.eval import mmlu
from dsv3.eval.data import DataError
from test_eval_fakes import ScriptedBackend


def write_csv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def question(q: str, answer: str, pick: str) -> list[str]:
    """A row whose correct answer is `answer` and whose "pick-me" option (the toy model's choice) is `pick`."""
    return [q] + [("pick-me" if L == pick else f"option {L}") for L in "ABCD"] + [answer]


def make_mmlu(root: Path) -> Path:
    """astronomy: 3 of 4 answerable by the scripted model; philosophy: 1 of 2."""
    write_csv(root / "dev" / "astronomy_dev.csv", [question(f"dev astro {i}, with a comma?", "ABCDA"[i], "ABCDA"[i])
                                                   for i in range(5)])
    write_csv(root / "dev" / "philosophy_dev.csv", [question(f"dev philo {i}", "B", "B") for i in range(5)])
    write_csv(root / "test" / "astronomy_test.csv", [question("What orbits\nthe Sun?", "A", "A"),
                                                     question("q2", "B", "B"), question("q3", "C", "C"),
                                                     question("q4", "D", "A")])
    write_csv(root / "test" / "philosophy_test.csv", [question("p1", "C", "C"), question("p2", "D", "B")])
    return root


def test_known_scores_per_subject_category_micro_macro(tmp_path):
    backend = ScriptedBackend()
    r = mmlu.evaluate(backend, make_mmlu(tmp_path), num_fewshot=5)
    assert r.metrics["acc"].value == pytest.approx(4 / 6) and r.metrics["acc"].n == 6
    xs = [1, 1, 1, 0, 1, 0]
    sd = math.sqrt(sum((x - 4 / 6) ** 2 for x in xs) / 5)
    assert r.metrics["acc"].stderr == pytest.approx(sd / math.sqrt(6))
    assert r.metrics["acc_macro"].value == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert r.groups["subject/astronomy"]["acc"].value == pytest.approx(0.75)
    assert r.groups["category/stem"]["acc"].value == pytest.approx(0.75)
    assert r.groups["category/humanities"]["acc"].value == pytest.approx(0.5)
    assert [s["pred"] for s in r.samples] == ["A", "B", "C", "A", "C", "B"]
    assert len(backend.requests) == 24 and {c for _, c in backend.requests} == {" A", " B", " C", " D"}


def test_prompt_is_lm_eval_format(tmp_path):
    data = mmlu.load(make_mmlu(tmp_path), num_fewshot=1)
    dev, test = data["astronomy"]
    expected = ("The following are multiple choice questions (with answers) about astronomy.\n\n"
                "dev astro 0, with a comma?\nA. pick-me\nB. option B\nC. option C\nD. option D\nAnswer: A\n\n"
                "What orbits\nthe Sun?\nA. pick-me\nB. option B\nC. option C\nD. option D\nAnswer:")
    assert mmlu.context(test[0], dev[:1]) == expected
    zero_shot = mmlu.context(test[1], [])
    assert zero_shot.startswith("The following are multiple choice questions (with answers) about astronomy.\n\nq2\nA.")


def test_limit_and_subject_selection(tmp_path):
    root = make_mmlu(tmp_path)
    r = mmlu.evaluate(ScriptedBackend(), root, num_fewshot=0, limit=1)
    assert r.metrics["acc"].n == 2  # one question per subject
    r = mmlu.evaluate(ScriptedBackend(), root, num_fewshot=2, subjects=["philosophy"])
    assert r.metrics["acc"].value == 0.5 and list(r.groups) == ["subject/philosophy", "category/humanities"]


def test_bad_inputs_name_the_culprit(tmp_path):
    with pytest.raises(DataError, match="MMLU data directory .*nope does not exist"):
        mmlu.load(tmp_path / "nope", 5)
    root = make_mmlu(tmp_path / "m")
    with open(root / "test" / "astronomy_test.csv", "a") as f:
        f.write("only,five,columns,here,A\n")
    with pytest.raises(DataError, match=r"astronomy_test\.csv:6: expected 6 columns, found 5"):
        mmlu.load(root, 0)
    root = make_mmlu(tmp_path / "n")
    write_csv(root / "test" / "philosophy_test.csv", [question("p1", "C", "C"), question("p2", "E", "B")])
    with pytest.raises(DataError, match=r"philosophy_test\.csv:2: answer 'E' is not one of A, B, C, D"):
        mmlu.load(root, 0)
    (root / "dev" / "astronomy_dev.csv").unlink()
    with pytest.raises(DataError, match=r"astronomy_dev\.csv does not exist"):
        mmlu.load(root, 5)
    with pytest.raises(DataError, match="fewer than --num-fewshot 6"):
        mmlu.load(make_mmlu(tmp_path / "o"), 6)
    with pytest.raises(DataError, match="subject 'chemistry'"):
        mmlu.load(make_mmlu(tmp_path / "p"), 0, ["chemistry"])


def test_every_standard_subject_has_a_category():
    assert len(mmlu.SUBJECT_CATEGORY) == 57
    assert sorted(set(mmlu.SUBJECT_CATEGORY.values())) == ["humanities", "other", "social_sciences", "stem"]
