"""The hot-answer cache: identical deterministic requests get the identical stored response body.

Only requests whose output is a function of the body alone qualify: temperature 0 (greedy) or a
fixed `seed`, not streamed. The key is the SHA-256 of the route, the served model and the canonical
JSON body. Two tiers: an in-memory LRU for the hot set, and a SQLite file that survives restarts
(a memory miss that hits on disk is promoted). Entries older than the TTL are ignored and dropped.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any


def is_deterministic(body: dict[str, Any]) -> bool:
    if body.get("stream"):
        return False
    return body.get("temperature", 1.0) == 0 or isinstance(body.get("seed"), int)


def cache_key(route: str, model: str, body: dict[str, Any]) -> str:
    canon = json.dumps({"route": route, "model": model, "body": {k: v for k, v in body.items() if k != "user"}},
                       sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


class ResponseCache:
    def __init__(self, path: str | Path | None = None, max_entries: int = 1024, ttl_s: float = 3600.0):
        self.max_entries, self.ttl_s = max_entries, ttl_s
        self._mem: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self.hits_by_tier = {"memory": 0, "disk": 0}
        self._db = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, created REAL, body BLOB)")

    def get(self, key: str) -> bytes | None:
        now = time.time()
        with self._lock:
            item = self._mem.get(key)
            if item is not None and now - item[0] <= self.ttl_s:
                self._mem.move_to_end(key)
                self.hits += 1
                self.hits_by_tier["memory"] += 1
                return item[1]
            if item is not None:
                del self._mem[key]
            if self._db is not None:
                row = self._db.execute("SELECT created, body FROM responses WHERE key = ?", (key,)).fetchone()
                if row is not None and now - row[0] <= self.ttl_s:
                    self._remember(key, row[0], bytes(row[1]))
                    self.hits += 1
                    self.hits_by_tier["disk"] += 1
                    return bytes(row[1])
                if row is not None:
                    self._db.execute("DELETE FROM responses WHERE key = ?", (key,))
            self.misses += 1
            return None

    def put(self, key: str, body: bytes) -> None:
        now = time.time()
        with self._lock:
            self._remember(key, now, body)
            if self._db is not None:
                self._db.execute("INSERT OR REPLACE INTO responses (key, created, body) VALUES (?, ?, ?)", (key, now, body))

    def _remember(self, key: str, created: float, body: bytes) -> None:
        self._mem[key] = (created, body)
        self._mem.move_to_end(key)
        while len(self._mem) > self.max_entries:
            self._mem.popitem(last=False)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
