"""MMLU (Hendrycks et al., 2021) scored like lm-evaluation-harness's `mmlu` task.

Each question becomes four requests (context, " A") ... (context, " D"); the prediction is the
letter with the highest log-likelihood. The context is the subject header, the first k `dev`
questions with their answers, then the question, exactly as lm-eval's `_default_template_yaml`
writes it, so our numbers can be put next to published lm-eval numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from dsv3.eval.backends import Backend
from dsv3.eval.data import DataError, read_csv_rows, require_dir
from dsv3.eval.report import Metric, TaskResult
from dsv3.eval.stats import macro_stderr, mean, mean_stderr

LETTERS = "ABCD"
_CATEGORIES = {
    "stem": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
            "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
            "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                  "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                  "prehistory professional_law world_religions",
    "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics high_school_psychology "
                       "human_sexuality professional_psychology public_relations security_studies sociology "
                       "us_foreign_policy",
    "other": "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
             "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
}
SUBJECT_CATEGORY = {s: cat for cat, subjects in _CATEGORIES.items() for s in subjects.split()}


@dataclass(frozen=True)
class Question:
    """One row of an MMLU CSV file."""

    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int
    where: str  # "file:line", for error messages and the per-sample log


def read_questions(path: Path, subject: str) -> list[Question]:
    """Parse a headerless `question,A,B,C,D,answer` CSV file."""
    out = []
    for line, row in read_csv_rows(path, 6):
        letter = row[5].strip()
        if letter not in tuple(LETTERS):
            raise DataError(f"{path}:{line}: answer {row[5]!r} is not one of A, B, C, D.")
        out.append(Question(subject, row[0], (row[1], row[2], row[3], row[4]), LETTERS.index(letter), f"{path}:{line}"))
    if not out:
        raise DataError(f"{path}: contains no questions.")
    return out


def load(data_dir: str | Path, num_fewshot: int, subjects: Sequence[str] | None = None
         ) -> dict[str, tuple[list[Question], list[Question]]]:
    """subject -> (dev questions, test questions) from the original release layout."""
    root = require_dir(data_dir, "MMLU data")
    test_dir = require_dir(root / "test", "MMLU test")
    files = {p.name[:-len("_test.csv")]: p for p in sorted(test_dir.glob("*_test.csv"))}
    if not files:
        raise DataError(f"MMLU test directory {test_dir} has no *_test.csv files.")
    for s in subjects or ():
        if s not in files:
            raise DataError(f"MMLU subject {s!r} has no file {test_dir / (s + '_test.csv')}.")
    data = {}
    for subject in subjects or files:
        dev: list[Question] = []
        if num_fewshot > 0:
            dev_file = root / "dev" / f"{subject}_dev.csv"
            if not dev_file.is_file():
                raise DataError(f"MMLU few-shot file {dev_file} does not exist "
                                f"(needed for --num-fewshot {num_fewshot}).")
            dev = read_questions(dev_file, subject)
            if len(dev) < num_fewshot:
                raise DataError(f"{dev_file} has {len(dev)} questions, fewer than --num-fewshot {num_fewshot}.")
        data[subject] = (dev, read_questions(files[subject], subject))
    return data


def doc_to_text(q: Question) -> str:
    return f"{q.question.strip()}\n" + "".join(f"{L}. {c}\n" for L, c in zip(LETTERS, q.choices)) + "Answer:"


def context(q: Question, shots: Sequence[Question]) -> str:
    """Subject header, k answered dev questions, then the question (lm-eval's MMLU prompt)."""
    header = f"The following are multiple choice questions (with answers) about {' '.join(q.subject.split('_'))}.\n\n"
    return header + "".join(f"{doc_to_text(s)} {LETTERS[s.answer]}\n\n" for s in shots) + doc_to_text(q)


def evaluate(backend: Backend, data_dir: str | Path, num_fewshot: int = 5, limit: int | None = None,
             subjects: Sequence[str] | None = None) -> TaskResult:
    """Accuracy per subject, per category, micro (all questions) and macro (mean of subjects)."""
    data = load(data_dir, num_fewshot, subjects)
    questions = [q for dev, test in data.values() for q in test[:limit]]
    shots = {s: dev[:num_fewshot] for s, (dev, _) in data.items()}
    requests = [(context(q, shots[q.subject]), " " + L) for q in questions for L in LETTERS]
    scores = backend.loglikelihood(requests, desc="mmlu")
    correct: dict[str, list[float]] = {}
    samples = []
    for i, q in enumerate(questions):
        lls = [scores[4 * i + j].logprob for j in range(4)]
        pred = max(range(4), key=lambda j: (lls[j], -j))  # first maximum, like numpy.argmax
        correct.setdefault(q.subject, []).append(float(pred == q.answer))
        samples.append({"where": q.where, "subject": q.subject, "answer": LETTERS[q.answer],
                        "pred": LETTERS[pred], "logprobs": lls})
    everything = [x for xs in correct.values() for x in xs]
    subject_acc = {s: Metric(mean(xs), mean_stderr(xs), len(xs)) for s, xs in correct.items()}
    groups = {f"subject/{s}": {"acc": m} for s, m in subject_acc.items()}
    by_cat: dict[str, list[float]] = {}
    for s, xs in correct.items():
        by_cat.setdefault(SUBJECT_CATEGORY.get(s, "other"), []).extend(xs)
    groups.update({f"category/{c}": {"acc": Metric(mean(xs), mean_stderr(xs), len(xs))} for c, xs in by_cat.items()})
    metrics = {
        "acc": Metric(mean(everything), mean_stderr(everything), len(everything)),
        "acc_macro": Metric(mean([m.value for m in subject_acc.values()]),
                            macro_stderr([m.stderr for m in subject_acc.values()]), len(everything)),
    }
    config = {"data_dir": str(data_dir), "num_fewshot": num_fewshot, "limit_per_subject": limit,
              "subjects": len(data)}
    return TaskResult("mmlu", backend.name, type(backend).__name__, metrics, "acc", config,
                      groups=groups, samples=samples)
