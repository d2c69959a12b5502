"""A tamper-evident audit log: append-only JSON lines, each chained to the one before it.

Every record carries `prev` (SHA-256 of the previous line's bytes, 64 zeros for the first) and
`hash` (SHA-256 of the record's own canonical JSON without `hash`). Editing a line breaks its own
`hash`; deleting, inserting or reordering lines breaks the next line's `prev`. Each line is written
with one `write` on an O_APPEND descriptor and fsynced before the response that caused it
completes, so a `kill -9` leaves either the whole line or none of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv3.errors import DSV3Error

GENESIS = "0" * 64


class AuditError(DSV3Error):
    """The audit log cannot be opened or continued."""


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def seal(record: dict[str, Any], prev: str) -> bytes:
    """The line (with newline) for `record` chained after a line whose hash is `prev`."""
    body = {**record, "prev": prev}
    body.pop("hash", None)
    body["hash"] = hashlib.sha256(_canonical(body)).hexdigest()
    return _canonical(body) + b"\n"


class AuditLog:
    """Appends sealed records; thread-safe, so the server calls it from a worker thread."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._prev = self._tail_hash()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.count = 0

    def _tail_hash(self) -> str:
        size = self.path.stat().st_size if self.path.exists() else 0
        if size == 0:
            return GENESIS
        with open(self.path, "rb") as f:
            span = 65536
            while True:  # read back far enough to hold the whole last line, however long
                f.seek(max(0, size - span))
                tail = f.read()
                if span >= size or tail.count(b"\n") >= 2:
                    break
                span *= 4
        if not tail.endswith(b"\n"):
            raise AuditError(f"audit log {self.path} ends in a torn line; run `dsv3 audit verify {self.path}`")
        return hashlib.sha256(tail[:-1].rsplit(b"\n", 1)[-1] + b"\n").hexdigest()

    def write(self, record: dict[str, Any]) -> None:
        with self._lock:
            line = seal(record, self._prev)
            os.write(self._fd, line)
            os.fsync(self._fd)
            self._prev = hashlib.sha256(line).hexdigest()
            self.count += 1

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1


@dataclass
class VerifyResult:
    ok: bool
    lines: int
    bad_line: int | None = None  # 1-based
    reason: str = ""


def verify(path: str | Path) -> VerifyResult:
    """Walk the chain; report the first line that was altered, or that follows a removed/reordered one."""
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"audit log {path} does not exist")
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        n = data.count(b"\n") + 1
        return VerifyResult(False, n - 1, n, "the line is torn (no trailing newline)")
    prev = GENESIS
    lines = data.split(b"\n")[:-1] if data else []
    for i, raw in enumerate(lines, 1):
        try:
            rec = json.loads(raw)
        except ValueError:
            return VerifyResult(False, len(lines), i, "the line is not JSON")
        if not isinstance(rec, dict) or "hash" not in rec or "prev" not in rec:
            return VerifyResult(False, len(lines), i, "the line has no 'hash'/'prev' fields")
        body = {k: v for k, v in rec.items() if k != "hash"}
        if hashlib.sha256(_canonical(body)).hexdigest() != rec["hash"]:
            return VerifyResult(False, len(lines), i, "the line was altered (its hash does not match its content)")
        if rec["prev"] != prev:
            return VerifyResult(False, len(lines), i, "the chain is broken before this line (a line was removed, inserted or reordered)")
        prev = hashlib.sha256(raw + b"\n").hexdigest()
    return VerifyResult(True, len(lines))
