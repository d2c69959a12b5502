"""Structured information extraction: documents in, JSON out, scored field by field.

Each record of a JSONL file holds a `document`, the `gold` JSON object to extract from it and the
JSON `schema` the answer must follow (per record, or one `--schema FILE` for all). The model is asked
in a chat turn and decodes under the schema's grammar (`response_format` json_schema over HTTP, the
same xgrammar grammar in-process), so every answer parses unless the token budget cuts it short.

Scoring (docs/eval.md, "Extraction"): both objects are flattened into (field path, value) pairs —
nested keys joined with ".", list items of objects by index (`items.0.name`), lists of scalars as
an unordered multiset under `path[]` — with null, "" and [] treated as absent, strings compared
after case-folding and collapsing whitespace, and numbers (or strings that are plain numbers, with
thousands separators) compared as numbers. A predicted pair is a true positive when the gold object
has the same pair. Precision = TP / predicted pairs, recall = TP / gold pairs, F1 their harmonic
mean; `f1` (primary), `precision` and `recall` are micro-averaged over all pairs of all documents,
`doc_f1` is the mean of per-document F1, `exact_match` the share of documents with every pair right
and none extra, and `valid_json` the share of answers that parsed as a JSON object.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

from dsv3.eval.backends import Backend
from dsv3.eval.data import DataError, read_jsonl, require_file
from dsv3.eval.report import Metric, TaskResult
from dsv3.eval.stats import mean, mean_stderr

EXAMPLE_DATA = Path(__file__).parent / "data" / "extraction_example.jsonl"
SYSTEM = ("You extract information from documents. Answer with one JSON object that follows the schema; "
          "use null for a field the document does not give.")
_NUMBER = re.compile(r"[-+]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?([eE][-+]?\d+)?")


# ---- scoring ------------------------------------------------------------------------------------
def normalize_value(value: Any) -> str | float | None:
    """A scalar as compared: numbers (and plain-number strings) as floats, strings case-folded with
    whitespace collapsed, booleans as "true"/"false"; None and "" as None (absent)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return float(value)
    text = " ".join(str(value).split()).casefold()
    if not text:
        return None
    if _NUMBER.fullmatch(text):
        return float(text.replace(",", ""))
    return text


def flatten(obj: Any, prefix: str = "") -> Counter:
    """(field path, normalized value) pairs of a JSON value, as a multiset (see the module docstring)."""
    out: Counter = Counter()
    if isinstance(obj, dict):
        for key, value in obj.items():
            out += flatten(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, list):
        if all(not isinstance(v, (dict, list)) for v in obj):
            for v in obj:
                norm = normalize_value(v)
                if norm is not None:
                    out[(f"{prefix}[]", _key(norm))] += 1
        else:
            for i, v in enumerate(obj):
                out += flatten(v, f"{prefix}.{i}" if prefix else str(i))
    else:
        norm = normalize_value(obj)
        if norm is not None:
            out[(prefix, _key(norm))] += 1
    return out


def _key(norm: str | float) -> str:
    """A hashable, exact form of a normalized value: floats by repr, so 5 == 5.0 but 'x' != 5."""
    return f"n:{norm!r}" if isinstance(norm, float) else f"s:{norm}"


def score_pairs(pred: Counter, gold: Counter) -> tuple[int, int, int]:
    """(true positives, predicted pairs, gold pairs)."""
    return sum((pred & gold).values()), sum(pred.values()), sum(gold.values())


def prf(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    """Precision, recall, F1; an empty side scores 1.0 when both are empty and 0.0 otherwise."""
    p = tp / n_pred if n_pred else float(n_gold == 0)
    r = tp / n_gold if n_gold else float(n_pred == 0)
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def parse_answer(text: str) -> dict | None:
    """The JSON object the model wrote, or None if it is not one."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def score(predictions: list[str], golds: list[dict]) -> tuple[dict[str, Metric], dict[str, dict[str, Metric]], list[dict]]:
    """Metrics, per-field groups and per-document rows for model answers against gold objects."""
    tp = n_pred = n_gold = 0
    doc_f1, exact, valid = [], [], []
    fields: dict[str, list[int]] = {}  # path -> [tp, pred, gold]
    rows = []
    for text, gold in zip(predictions, golds):
        parsed = parse_answer(text)
        pred_pairs, gold_pairs = flatten(parsed or {}), flatten(gold)
        t, np_, ng = score_pairs(pred_pairs, gold_pairs)
        tp, n_pred, n_gold = tp + t, n_pred + np_, n_gold + ng
        doc_f1.append(prf(t, np_, ng)[2])
        exact.append(float(t == np_ == ng))
        valid.append(float(parsed is not None))
        hit = pred_pairs & gold_pairs
        for counter, slot in ((hit, 0), (pred_pairs, 1), (gold_pairs, 2)):
            for (path, _), c in counter.items():
                fields.setdefault(path, [0, 0, 0])[slot] += c
        rows.append({"valid_json": parsed is not None, "tp": t, "predicted": np_, "gold": ng,
                     "missed": sorted(p for p, _ in (gold_pairs - pred_pairs)),
                     "wrong": sorted(p for p, _ in (pred_pairs - gold_pairs))})
    p, r, f = prf(tp, n_pred, n_gold)
    metrics = {"f1": Metric(f, math.nan, n_gold), "precision": Metric(p, math.nan, n_pred),
               "recall": Metric(r, math.nan, n_gold), "doc_f1": Metric(mean(doc_f1), mean_stderr(doc_f1), len(doc_f1)),
               "exact_match": Metric(mean(exact), mean_stderr(exact), len(exact)),
               "valid_json": Metric(mean(valid), mean_stderr(valid), len(valid))}
    groups = {f"field/{path}": {"f1": Metric(prf(*c)[2], math.nan, c[2]), "precision": Metric(prf(*c)[0], math.nan, c[1]),
                                "recall": Metric(prf(*c)[1], math.nan, c[2])} for path, c in sorted(fields.items())}
    return metrics, groups, rows


# ---- data ---------------------------------------------------------------------------------------
def load(path: str | Path, schema_file: str | Path | None = None) -> list[dict]:
    """Records with `document` (str), `gold` (object) and `schema` (object; from `schema_file` when absent)."""
    shared = None
    if schema_file is not None:
        p = require_file(schema_file, "JSON schema")
        try:
            shared = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{p}: not valid JSON ({e}).") from None
        if not isinstance(shared, dict):
            raise DataError(f"{p}: a JSON schema must be an object.")
    rows = read_jsonl(path, ("document",), "extraction data")
    for r in rows:
        where = f"{path}:{r['_line']}"
        if not isinstance(r.get("gold"), dict):
            raise DataError(f"{where}: 'gold' must be a JSON object (the fields to extract).")
        r["schema"] = r.get("schema", shared)
        if not isinstance(r["schema"], dict):
            raise DataError(f"{where}: no JSON 'schema' object (give one per record or --schema FILE).")
    return rows


def messages(record: dict) -> list[dict[str, str]]:
    schema = json.dumps(record["schema"], ensure_ascii=False)
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Schema:\n{schema}\n\nDocument:\n{record['document']}"}]


def evaluate(backend: Backend, data: str | Path | None = None, schema_file: str | Path | None = None,
             limit: int | None = None, max_tokens: int = 256) -> TaskResult:
    """Extract every record's fields under its schema's grammar and score them against the gold objects."""
    data = data or EXAMPLE_DATA
    records = load(data, schema_file)[:limit]
    answers = backend.extract_json([messages(r) for r in records], [r["schema"] for r in records], max_tokens,
                                   desc="extraction")
    metrics, groups, rows = score(answers, [r["gold"] for r in records])
    samples = [{"line": r["_line"], "id": r.get("id"), "answer": a, **row} for r, a, row in zip(records, answers, rows)]
    config = {"data": str(data), "schema_file": str(schema_file) if schema_file else None, "limit": limit,
              "max_tokens": max_tokens}
    return TaskResult("extraction", backend.name, type(backend).__name__, metrics, "f1", config, groups=groups,
                      samples=samples)
