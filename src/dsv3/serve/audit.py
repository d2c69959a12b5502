"""A tamper-evident audit log: append-only JSON lines, each chained to the one before it.

Every record carries `prev` (SHA-256 of the previous line's bytes, 64 zeros for the first) and
`hash`, a digest of the record's own canonical JSON without `hash`. Editing a line breaks its own
`hash`; deleting, inserting or reordering lines breaks the next line's `prev`.

Plain SHA-256 only shows accidents and careless edits: whoever can write the file can also
recompute every hash after a forged line. With a key (`--audit-log-key FILE`) each `hash` is an
HMAC-SHA256 under that key and the record says `"alg": "hmac-sha256"`, so forged or re-chained
lines fail `dsv3 audit verify --key FILE` unless the forger holds the key. A log may start unkeyed
and continue keyed; an unkeyed line after a keyed one fails verification.

Durability: each line is written in full (`write` is repeated until every byte is out) on an
O_APPEND descriptor and fsynced before the response that caused it sends its last byte. A crash in
the middle of a large write (`kill -9` during `--audit-log-content` lines) can still leave a torn
last line; opening the log (or `dsv3 audit repair`) moves the torn bytes to a file beside it,
truncates the log to its last whole line and appends an `audit_repair` record saying how many
bytes went where (their SHA-256 included), so the chain continues and nothing is silently lost.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dsv3.errors import DSV3Error

log = logging.getLogger("dsv3.serve")

GENESIS = "0" * 64
KEYED = "hmac-sha256"
MIN_KEY_BYTES = 16


class AuditError(DSV3Error):
    """The audit log (or its key) cannot be opened, repaired or continued."""


def read_key(path: str | Path) -> bytes:
    """An HMAC key file: its bytes, surrounding whitespace removed (e.g. `head -c 32 /dev/urandom | base64`)."""
    p = Path(path)
    if not p.is_file():
        raise AuditError(f"audit key file {p} does not exist")
    key = p.read_bytes().strip()
    if len(key) < MIN_KEY_BYTES:
        raise AuditError(f"audit key file {p} holds {len(key)} bytes; a key needs at least {MIN_KEY_BYTES}")
    return key


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _digest(body: bytes, key: bytes | None) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest() if key else hashlib.sha256(body).hexdigest()


def seal(record: dict[str, Any], prev: str, key: bytes | None = None) -> bytes:
    """The line (with newline) for `record` chained after a line whose SHA-256 is `prev`."""
    body = {k: v for k, v in record.items() if k not in ("hash", "alg")}
    body["prev"] = prev
    if key:
        body["alg"] = KEYED
    body["hash"] = _digest(_canonical(body), key)
    return _canonical(body) + b"\n"


def _last_newline(f: Any, size: int) -> int:
    """Offset of the last b"\\n" in an open file of `size` bytes (-1 if none), reading backwards in blocks."""
    pos = size
    while pos > 0:
        start = max(0, pos - 65536)
        f.seek(start)
        i = f.read(pos - start).rfind(b"\n")
        if i >= 0:
            return start + i
        pos = start
    return -1


def _last_line(path: Path) -> bytes | None:
    """The last whole line (with its newline) of a log that ends in one; None if empty."""
    size = path.stat().st_size if path.exists() else 0
    if size == 0:
        return None
    with open(path, "rb") as f:
        end = _last_newline(f, size)
        if end != size - 1:
            raise AuditError(f"audit log {path} ends in a torn line")
        start = _last_newline(f, end) + 1
        f.seek(start)
        return f.read(end + 1 - start)


@dataclass
class RepairResult:
    torn_bytes: int
    moved_to: Path
    torn_sha256: str


def repair(path: str | Path, key: bytes | None = None) -> RepairResult | None:
    """Move a torn last line aside and record that in the chain; None when the log ends in a whole line."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return None
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        cut = _last_newline(f, size) + 1
        if cut == size:
            return None
        last = None
        if cut:
            start = _last_newline(f, cut - 1) + 1
            f.seek(start)
            last = f.read(cut - start)
        if last is not None and key is None and _is_keyed(last):
            raise AuditError(f"audit log {path} is keyed (HMAC): repair it with its key (--key FILE / --audit-log-key)")
        f.seek(cut)
        torn = f.read()
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        aside = path.with_name(f"{path.name}.torn-{stamp}")
        with open(aside, "xb") as g:
            g.write(torn)
            g.flush()
            os.fsync(g.fileno())
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
    result = RepairResult(len(torn), aside, hashlib.sha256(torn).hexdigest())
    prev = hashlib.sha256(last).hexdigest() if last is not None else GENESIS
    line = seal({"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": "audit_repair",
                 "torn_bytes": result.torn_bytes, "torn_sha256": result.torn_sha256, "moved_to": aside.name}, prev, key)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        _write_all(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return result


def _is_keyed(line: bytes) -> bool:
    try:
        return json.loads(line).get("alg") == KEYED
    except (ValueError, AttributeError):
        return False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class AuditLog:
    """Appends sealed records; thread-safe, so the server calls it from a worker thread.

    Opening a log with a torn last line repairs it (a warning names the file the torn bytes went to).
    """

    def __init__(self, path: str | Path, key: bytes | None = None):
        self.path, self.key = Path(path), key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.repaired = repair(self.path, key)
        if self.repaired is not None:
            log.warning("audit log %s ended in a torn line (a crash mid-write): %d bytes moved to %s, chain continues",
                        self.path, self.repaired.torn_bytes, self.repaired.moved_to)
        last = _last_line(self.path)
        if last is not None and key is None and _is_keyed(last):
            raise AuditError(f"audit log {self.path} is keyed (HMAC); continue it with its key (--audit-log-key FILE)")
        self._prev = hashlib.sha256(last).hexdigest() if last is not None else GENESIS
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        with self._lock:
            line = seal(record, self._prev, self.key)
            _write_all(self._fd, line)
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
    keyed_from: int | None = None  # first HMAC line (1-based), if any


def verify(path: str | Path, key: bytes | None = None) -> VerifyResult:
    """Walk the chain; report the first line that was altered, forged, or follows a removed/reordered one.

    With `key`, every line from the first keyed one on must carry a valid HMAC under it, and the log
    must hold at least one keyed line."""
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"audit log {path} does not exist")
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        n = data.count(b"\n") + 1
        return VerifyResult(False, n - 1, n, "the line is torn (no trailing newline); `dsv3 audit repair` moves it aside")
    prev, keyed_from = GENESIS, None
    lines = data.split(b"\n")[:-1] if data else []
    for i, raw in enumerate(lines, 1):
        try:
            rec = json.loads(raw)
        except ValueError:
            return VerifyResult(False, len(lines), i, "the line is not JSON")
        if not isinstance(rec, dict) or "hash" not in rec or "prev" not in rec:
            return VerifyResult(False, len(lines), i, "the line has no 'hash'/'prev' fields")
        alg = rec.get("alg")
        body = _canonical({k: v for k, v in rec.items() if k != "hash"})
        if alg == KEYED:
            if key is None:
                return VerifyResult(False, len(lines), i, "the line is keyed (HMAC): verify with the key (--key FILE)")
            keyed_from = keyed_from or i
            if not hmac.compare_digest(_digest(body, key), str(rec["hash"])):
                return VerifyResult(False, len(lines), i, "the line's HMAC does not match: it was altered or forged, "
                                                          "or this is not the log's key")
        elif alg is None:
            if keyed_from is not None:
                return VerifyResult(False, len(lines), i, "an unkeyed line follows keyed lines (a forged append?)")
            if hashlib.sha256(body).hexdigest() != rec["hash"]:
                return VerifyResult(False, len(lines), i, "the line was altered (its hash does not match its content)")
        else:
            return VerifyResult(False, len(lines), i, f"the line names an unknown digest {alg!r}")
        if rec["prev"] != prev:
            return VerifyResult(False, len(lines), i, "the chain is broken before this line (a line was removed, inserted or reordered)")
        prev = hashlib.sha256(raw + b"\n").hexdigest()
    if key is not None and keyed_from is None:
        return VerifyResult(False, len(lines), None, "no line is keyed: this log was not written with an HMAC key")
    return VerifyResult(True, len(lines), keyed_from=keyed_from)
