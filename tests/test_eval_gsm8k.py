"""GSM8K: lm-eval's extraction regexes and normalisation, few-shot prompts, scripted scores, bad data."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from dsv3.eval import gsm8k
from dsv3.eval.data import DataError
from test_eval_fakes import ScriptedBackend

# lm-evaluation-harness gsm8k.yaml (version 3), copied verbatim as the reference.
LM_EVAL_STRICT = r"#### (\-?[0-9\.\,]+)"
LM_EVAL_FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"


def test_regexes_are_lm_evals():
    assert gsm8k.STRICT.pattern == LM_EVAL_STRICT
    assert gsm8k.FLEXIBLE.pattern == LM_EVAL_FLEXIBLE
    assert gsm8k.STOP == ("Question:", "</s>", "<|im_end|>")


@pytest.mark.parametrize("text,strict,flexible", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7", "7"),
    ("#### 1,234.\nQuestion: next", "1,234.", "1,234."),
    ("The total is $18.", "[invalid]", "$18."),
    ("He loses 5, so -12 remain #### -12", "-12", "-12"),
    ("#### 3 and later #### 4", "3", "4"),
    ("no digits at all", "[invalid]", "[invalid]"),
    ("answer: 7", "[invalid]", "7"),  # single digit: second alternative of the flexible regex
])
def test_extraction(text, strict, flexible):
    assert gsm8k.extract_strict(text) == strict
    assert gsm8k.extract_flexible(text) == flexible


@pytest.mark.parametrize("pred,answer,ok", [
    ("1,234.", "work <<1+1=2>>\n#### 1234", True),
    ("$18.", "#### 18", True),
    ("18.5", "#### 18", False),
    ("[invalid]", "#### 18", False),
    ("-3", "#### -3", True),
])
def test_exact_match_normalisation(pred, answer, ok):
    assert gsm8k.is_correct(pred, answer) is ok


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TEST = [
    {"question": "Q-strict: 40 + 2?", "answer": "40 + 2 = <<40+2=42>>42\n#### 42"},
    {"question": "Q-flex: 3 + 4?", "answer": "#### 7"},
    {"question": "Q-wrong: 2 * 2?", "answer": "#### 4"},
    {"question": "Q-comma: 999 + 1?", "answer": "#### 1000"},
]
REPLIES = {"Q-strict": " It is 42.\n#### 42", "Q-flex": " The answer is 7.", "Q-wrong": " 2 * 2 = 5\n#### 5",
           "Q-comma": " 999 + 1 = 1,000\n#### 1,000\n\nQuestion: something the model rambles on"}


def reply(prompt: str) -> str:
    last = prompt.rsplit("Question: ", 1)[1]
    return REPLIES[last.split(":")[0]]


def test_scripted_scores(tmp_path):
    test = write_jsonl(tmp_path / "test.jsonl", TEST)
    backend = ScriptedBackend(reply)
    r = gsm8k.evaluate(backend, test, num_fewshot=0)
    assert r.metrics["strict_match"].value == pytest.approx(2 / 4)    # Q-strict, Q-comma
    assert r.metrics["flexible_extract"].value == pytest.approx(3 / 4)  # + Q-flex
    assert backend.gen_kwargs["temperature"] == 0.0 and backend.gen_kwargs["stop"] == gsm8k.STOP
    assert r.samples[3]["generation"] == " 999 + 1 = 1,000\n#### 1,000\n\n"  # cut at "Question:"
    assert r.samples[1]["strict"] == "[invalid]" and r.samples[1]["flexible"] == "7."


def test_fewshot_prompt_from_train_file(tmp_path):
    train_rows = [{"question": f"train q{i}", "answer": f"step {i}\n#### {i}"} for i in range(8)]
    test = write_jsonl(tmp_path / "test.jsonl", TEST)
    train = write_jsonl(tmp_path / "train.jsonl", train_rows)
    backend = ScriptedBackend(reply)
    gsm8k.evaluate(backend, test, train, num_fewshot=3, seed=11, limit=2)
    rng = random.Random(11)
    for prompt, doc in zip(backend.prompts, TEST):
        shots = rng.sample(train_rows, 3)
        expected = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
        assert prompt == expected + f"Question: {doc['question']}\nAnswer:"
    assert len(backend.prompts) == 2 and backend.prompts[0] != backend.prompts[1]


def test_bad_inputs_name_the_culprit(tmp_path):
    test = write_jsonl(tmp_path / "test.jsonl", TEST)
    with pytest.raises(DataError, match="needs --train FILE"):
        gsm8k.evaluate(ScriptedBackend(reply), test, None, num_fewshot=5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(TEST[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=re.escape(f"{bad}:2: not valid JSON")):
        gsm8k.load(bad, "GSM8K test")
    write_jsonl(bad, [TEST[0], {"question": "q", "answer": "no final line"}])
    with pytest.raises(DataError, match=re.escape(f"{bad}:2: answer has no final '#### N' line")):
        gsm8k.load(bad, "GSM8K test")
    write_jsonl(bad, [{"question": "q"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: missing string field\(s\) answer"):
        gsm8k.load(bad, "GSM8K test")
    with pytest.raises(DataError, match="does not exist"):
        gsm8k.load(tmp_path / "missing.jsonl", "GSM8K test")
