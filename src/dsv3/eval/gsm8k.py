"""GSM8K (Cobbe et al., 2021) scored like lm-evaluation-harness's `gsm8k` task (version 3).

Greedy generation after k `Question:/Answer:` examples drawn at random from a train file,
then two extractions of the final answer: strict (`#### N`, the format the few-shot examples
teach) and flexible (the last number in the text). Both are reported because strict-match
collapses for models that drift from the format while flexible-extract does not (lm-eval #3438).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from dsv3.eval.backends import Backend
from dsv3.eval.data import DataError, read_jsonl
from dsv3.eval.report import Metric, TaskResult
from dsv3.eval.stats import mean, mean_stderr

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")  # lm-eval exact_match regexes_to_ignore, applied in order
STOP = ("Question:", "</s>", "<|im_end|>")
INVALID = "[invalid]"


def extract_strict(text: str) -> str:
    """First `#### N` in the text (lm-eval "strict-match": regex + take_first)."""
    m = STRICT.findall(text)
    return m[0].strip() if m else INVALID


def extract_flexible(text: str) -> str:
    """Last number-like span in the text (lm-eval "flexible-extract": group_select -1)."""
    m = FLEXIBLE.findall(text)
    if not m:
        return INVALID
    groups = [g for g in m[-1] if g]
    return groups[0].strip() if groups else INVALID


def normalize(text: str) -> str:
    """lm-eval exact_match normalisation: drop commas, '$', everything up to '#### ', a final '.'; lowercase."""
    for pattern in IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def is_correct(extracted: str, reference_answer: str) -> bool:
    return normalize(extracted) == normalize(reference_answer)


def load(path: str | Path, what: str) -> list[dict]:
    rows = read_jsonl(path, ("question", "answer"), what)
    for r in rows:
        if not STRICT.search(r["answer"]):
            raise DataError(f"{path}:{r['_line']}: answer has no final '#### N' line.")
    return rows


def prompt(question: str, shots: list[dict]) -> str:
    return "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots) + \
        f"Question: {question}\nAnswer:"


def evaluate(backend: Backend, test_file: str | Path, train_file: str | Path | None = None, num_fewshot: int = 5,
             limit: int | None = None, seed: int = 1234, max_tokens: int = 256) -> TaskResult:
    """Exact match of the strict and flexible extractions against the `#### N` reference."""
    test = load(test_file, "GSM8K test")[:limit]
    train: list[dict] = []
    if num_fewshot > 0:
        if train_file is None:
            raise DataError("GSM8K few-shot prompting needs --train FILE (grade-school-math train.jsonl), "
                            "or pass --num-fewshot 0.")
        train = load(train_file, "GSM8K train")
        if len(train) < num_fewshot:
            raise DataError(f"{train_file} has {len(train)} examples, fewer than --num-fewshot {num_fewshot}.")
    rng = random.Random(seed)  # one stream for all documents, in order, like lm-eval's default sampler
    prompts = [prompt(d["question"], rng.sample(train, num_fewshot) if num_fewshot else []) for d in test]
    outs = backend.generate(prompts, stop=STOP, max_tokens=max_tokens, temperature=0.0, desc="gsm8k")
    strict, flexible, samples = [], [], []
    for d, out in zip(test, outs):
        text = out[0]
        s, f = extract_strict(text), extract_flexible(text)
        strict.append(float(is_correct(s, d["answer"])))
        flexible.append(float(is_correct(f, d["answer"])))
        samples.append({"line": d["_line"], "target": normalize(d["answer"]), "generation": text,
                        "strict": s, "flexible": f, "strict_correct": bool(strict[-1]),
                        "flexible_correct": bool(flexible[-1])})
    metrics = {"strict_match": Metric(mean(strict), mean_stderr(strict), len(strict)),
               "flexible_extract": Metric(mean(flexible), mean_stderr(flexible), len(flexible))}
    config = {"test_file": str(test_file), "train_file": str(train_file) if train_file else None,
              "num_fewshot": num_fewshot, "limit": limit, "seed": seed, "max_tokens": max_tokens}
    return TaskResult("gsm8k", backend.name, type(backend).__name__, metrics, "strict_match", config,
                      samples=samples)
