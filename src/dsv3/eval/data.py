"""Reading benchmark files with errors that point at the exact file and line.

Benchmark data is downloaded and unpacked by hand, so the common failures are a wrong
directory, a truncated download, or a file from a different release. Each of those must stop
the run with one sentence naming the culprit, never a traceback or a silently smaller test set.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Iterator

from dsv3.errors import DSV3Error


class DataError(DSV3Error):
    """A benchmark file or directory is missing or malformed."""


def require_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise DataError(f"{what} directory {p} does not exist (see docs/eval.md for where to put the files).")
    return p


def require_file(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} file {p} does not exist (see docs/eval.md for where to put the files).")
    return p


def read_jsonl(path: str | Path, fields: tuple[str, ...], what: str) -> list[dict]:
    """Objects of a JSON-lines file (optionally .gz), each required to carry string `fields`."""
    p = require_file(path, what)
    rows = []
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{p}:{lineno}: not valid JSON ({e.msg}).") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}.")
                missing = [k for k in fields if not isinstance(obj.get(k), str)]
                if missing:
                    raise DataError(f"{p}:{lineno}: missing string field(s) {', '.join(missing)}.")
                obj["_line"] = lineno
                rows.append(obj)
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise DataError(f"{p}: cannot be read as UTF-8 JSON lines ({e}).") from None
    if not rows:
        raise DataError(f"{p}: contains no records.")
    return rows


def read_csv_rows(path: Path, ncols: int) -> Iterator[tuple[int, list[str]]]:
    """(line number, row) for each record of a headerless CSV, which must have `ncols` columns."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            start = 1
            for row in reader:
                if row and len(row) != ncols:
                    raise DataError(f"{path}:{start}: expected {ncols} columns, found {len(row)}.")
                if row:
                    yield start, row
                start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({e}).") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}).") from None
