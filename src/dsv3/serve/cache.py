"""The hot-answer cache: identical deterministic requests get the identical stored response body.

Only requests whose output is a function of the body alone qualify: temperature 0 (greedy) or a
fixed `seed`, not streamed. The key is the SHA-256 of the route, the served model, the canonical
JSON body, the tenant (the API key id: one tenant never gets another's answer or response id) and
the fingerprint of the weights actually loaded (`weights_fingerprint`: base model, LoRA adapters
and quantization, sampled from the tensors in memory). Two tiers: an in-memory LRU for the hot set,
and a SQLite file that survives restarts (a memory miss that hits on disk is promoted). A SQLite
file written for other weights is emptied when the server binds it, with a log line; entries older
than the TTL are ignored and dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

log = logging.getLogger("dsv3.serve")


def is_deterministic(body: dict[str, Any]) -> bool:
    if body.get("stream"):
        return False
    return body.get("temperature", 1.0) == 0 or isinstance(body.get("seed"), int)


def cache_key(route: str, model: str, body: dict[str, Any], tenant: str | None = None, fingerprint: str = "") -> str:
    canon = json.dumps({"route": route, "model": model, "tenant": tenant, "weights": fingerprint,
                        "body": {k: v for k, v in body.items() if k != "user"}},
                       sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode()).hexdigest()


def weights_fingerprint(model: Any, adapter_names: list[str] | None = None, samples: int = 64) -> str:
    """SHA-256 over every parameter and buffer of the loaded model: name, dtype, shape and `samples`
    evenly spaced elements (a retrained, re-quantized or re-adapted model differs there), plus the
    adapter names in slot order. Cheap for any size: a few small reads per tensor."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted([*model.named_parameters(), *model.named_buffers()], key=lambda kv: kv[0]):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.detach().reshape(-1)
        if flat.numel() and flat.device.type != "meta":
            idx = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel())).long().to(flat.device)
            h.update(flat[idx].contiguous().cpu().view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(list(adapter_names or [])).encode())
    return h.hexdigest()


class ResponseCache:
    def __init__(self, path: str | Path | None = None, max_entries: int = 1024, ttl_s: float = 3600.0):
        self.max_entries, self.ttl_s = max_entries, ttl_s
        self.fingerprint = ""  # of the weights served; set by `bind` once the model has loaded
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
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")

    def bind(self, fingerprint: str) -> None:
        """Serve answers of these weights only: a SQLite tier written for other weights is emptied (logged)."""
        with self._lock:
            self.fingerprint = fingerprint
            self._mem.clear()
            if self._db is None:
                return
            row = self._db.execute("SELECT value FROM meta WHERE name = 'weights'").fetchone()
            n = self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
            if n and (row is None or row[0] != fingerprint):
                self._db.execute("DELETE FROM responses")
                log.warning("response cache: dropped %d answers stored for other weights (fingerprint %s, now %s...)",
                            n, f"{row[0][:12]}..." if row else "unknown", fingerprint[:12])
            self._db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('weights', ?)", (fingerprint,))

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
