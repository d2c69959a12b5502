"""API keys: only SHA-256 digests are kept in memory, and a presented key is compared in constant time.

A key file holds one entry a line, `[key_id:]sha256hex` (blank lines and `#` comments ignored), so
the secret itself never sits on the server's disk. The key id -- the given label, or the first 12
hex digits of the digest -- is what the audit log and rate limiter see, never the key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

from dsv3.errors import DSV3Error

_HEX = re.compile(r"^[0-9a-f]{64}$")


class KeyFileError(DSV3Error):
    """The API-key file is missing or has a line that is not `[id:]sha256hex`."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class APIKeys:
    """The accepted keys, as (key id, digest) pairs; empty means authentication is off."""

    def __init__(self, entries: list[tuple[str, str]] | None = None):
        self.entries = list(entries or [])

    @classmethod
    def build(cls, keys: list[str] | None = None, key_file: str | Path | None = None) -> APIKeys:
        entries = [(digest(k)[:12], digest(k)) for k in keys or []]
        if key_file is not None:
            entries += cls.read_file(Path(key_file))
        return cls(entries)

    @staticmethod
    def read_file(path: Path) -> list[tuple[str, str]]:
        if not path.is_file():
            raise KeyFileError(f"API-key file {path} does not exist")
        out = []
        for n, raw in enumerate(path.read_text().splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            kid, _, h = line.rpartition(":")
            h = h.lower()
            if not _HEX.match(h):
                raise KeyFileError(f"{path} line {n} is not '[key_id:]sha256hex' (64 hex digits)")
            out.append((kid or h[:12], h))
        if not out:
            raise KeyFileError(f"API-key file {path} holds no keys")
        return out

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def check(self, authorization: str | None) -> str | None:
        """The key id for an `Authorization: Bearer KEY` header, or None if it matches no key."""
        if not authorization:
            return None
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        presented = digest(key.strip()).encode()
        found = None
        for kid, h in self.entries:  # visit every entry: the time taken does not depend on which one matched
            if hmac.compare_digest(presented, h.encode()):
                found = kid
        return found
