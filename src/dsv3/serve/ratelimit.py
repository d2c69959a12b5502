"""Per-key token buckets for requests per minute and tokens per minute.

A bucket holds up to one minute's allowance and refills continuously. A request is admitted when
its request bucket has a whole token and its token bucket is not in debt; the tokens a request
actually used are charged after it finishes (they are not known before), which may push the bucket
into debt and delay that key's next request. A refusal says how long to wait (`Retry-After`).
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from dsv3.errors import DSV3Error


class RateLimitSpecError(DSV3Error):
    """A --rate-limit value that is not `RPM[,TPM]`."""


@dataclass
class RateLimit:
    requests_per_minute: float
    tokens_per_minute: float | None = None

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:,\s*(\d+(?:\.\d+)?)\s*)?", text or "")
        if not m or float(m.group(1)) <= 0 or (m.group(2) is not None and float(m.group(2)) <= 0):
            raise RateLimitSpecError(f"--rate-limit must be 'RPM' or 'RPM,TPM' with positive numbers, got {text!r}")
        return cls(float(m.group(1)), float(m.group(2)) if m.group(2) else None)


class _Bucket:
    def __init__(self, per_minute: float, now: float):
        self.rate, self.capacity, self.level, self.t = per_minute / 60.0, per_minute, per_minute, now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now

    def wait_for(self, need: float) -> float:
        return max(0.0, (need - self.level) / self.rate)


class RateLimiter:
    def __init__(self, limit: RateLimit, clock=time.monotonic):
        self.limit, self.clock = limit, clock
        self._req: dict[str, _Bucket] = {}
        self._tok: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def _buckets(self, key: str, now: float) -> tuple[_Bucket, _Bucket | None]:
        req = self._req.setdefault(key, _Bucket(self.limit.requests_per_minute, now))
        tok = None
        if self.limit.tokens_per_minute:
            tok = self._tok.setdefault(key, _Bucket(self.limit.tokens_per_minute, now))
        return req, tok

    def admit(self, key: str) -> int | None:
        """Take one request from `key`'s allowance, or return whole seconds to wait (Retry-After)."""
        with self._lock:
            now = self.clock()
            req, tok = self._buckets(key, now)
            req.refill(now)
            wait = req.wait_for(1.0)
            if tok is not None:
                tok.refill(now)
                wait = max(wait, tok.wait_for(0.0))  # admitted once out of debt
            if wait > 0:
                return max(1, math.ceil(wait))
            req.level -= 1.0
            return None

    def charge(self, key: str, tokens: int) -> None:
        """Charge the tokens a finished request used against `key`'s token allowance."""
        if not self.limit.tokens_per_minute or tokens <= 0:
            return
        with self._lock:
            now = self.clock()
            _, tok = self._buckets(key, now)
            tok.refill(now)
            tok.level -= tokens


class RefusalLog:
    """How many lines a client address may add to the audit and access logs for refused requests.

    A refused request (401, 413, 429) is logged as one line without its body, but an unauthenticated
    client could still send them as fast as it can: each address gets a bucket of `per_minute` lines
    that refills continuously; past it, refusals are counted and the next line that is written says
    how many were left out (`suppressed`). At most `max_addresses` buckets are kept (least recent out).
    """

    def __init__(self, per_minute: float = 20.0, max_addresses: int = 10000, clock=time.monotonic):
        self.per_minute, self.max_addresses, self.clock = per_minute, max_addresses, clock
        self._buckets: "OrderedDict[str, list[float]]" = OrderedDict()  # addr -> [level, last time, suppressed]
        self._lock = threading.Lock()

    def admit(self, address: str) -> tuple[bool, int]:
        """(write this line?, refusals suppressed since the last line written for this address)."""
        with self._lock:
            now = self.clock()
            b = self._buckets.pop(address, None) or [self.per_minute, now, 0]
            b[0] = min(self.per_minute, b[0] + (now - b[1]) * self.per_minute / 60.0)
            b[1] = now
            self._buckets[address] = b
            while len(self._buckets) > self.max_addresses:
                self._buckets.popitem(last=False)
            if b[0] < 1.0:
                b[2] += 1
                return False, 0
            b[0] -= 1.0
            suppressed, b[2] = int(b[2]), 0
            return True, suppressed
