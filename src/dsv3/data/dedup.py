"""Exact and near-duplicate detection for whole files.

Exact duplicates share a SHA-256 of their bytes. Near duplicates are found with MinHash over
character shingles of whitespace-normalised text (so re-indentation or a few edited lines do
not hide a copy) and LSH banding, which only compares signatures that agree on a whole band.
Everything is numpy and seeded, so the same inputs always drop the same files.
"""

from __future__ import annotations

import hashlib

import numpy as np

SHINGLE_BYTES = 16   # a shingle is 16 consecutive bytes of normalised text (~3 words of code)
NUM_PERM = 128
_PRIME = np.uint64(0x100000001B3)  # odd multiplier of the polynomial shingle hash
_U64 = np.uint64


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def normalize(text: str) -> bytes:
    """Collapse every run of whitespace to one space: layout edits must not change shingles."""
    return " ".join(text.split()).encode("utf-8")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: turns the weak polynomial hash into well-spread 64-bit values."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> _U64(30))
        x = x * _U64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> _U64(27))
        x = x * _U64(0x94D049BB133111EB)
        return x ^ (x >> _U64(31))


def shingle_hashes(data: bytes, k: int = SHINGLE_BYTES) -> np.ndarray:
    """Sorted unique 64-bit hashes of every k-byte substring (the whole text if shorter)."""
    b = np.frombuffer(data, dtype=np.uint8).astype(np.uint64)
    if len(b) == 0:
        return np.empty(0, dtype=np.uint64)
    k = min(k, len(b))
    n = len(b) - k + 1
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):
            h = h * _PRIME + b[j:j + n]
    return np.unique(_mix64(h))


class MinHasher:
    """`num_perm` multiply-add hash functions over mixed shingle hashes; the signature keeps each
    function's minimum, and the share of equal entries estimates the Jaccard similarity."""

    def __init__(self, num_perm: int = NUM_PERM, seed: int = 0, shingle: int = SHINGLE_BYTES):
        rng = np.random.default_rng([seed, 0x6D68])
        self.a = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * _U64(2) + _U64(1)
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self.num_perm, self.shingle = num_perm, shingle

    def signature(self, x: np.ndarray) -> np.ndarray:
        """Signature of a file's `shingle_hashes`."""
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        if len(x) == 0:
            return sig
        tmp = np.empty_like(x)
        with np.errstate(over="ignore"):
            for i in range(self.num_perm):
                np.multiply(x, self.a[i], out=tmp)
                tmp += self.b[i]
                sig[i] = tmp.min()
        return sig


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def jaccard(x: np.ndarray, y: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted unique shingle-hash arrays."""
    inter = len(np.intersect1d(x, y, assume_unique=True))
    union = len(x) + len(y) - inter
    return inter / union if union else 1.0


def lsh_params(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising the false-positive plus
    false-negative area of the S-curve 1-(1-s^rows)^bands around `threshold`."""
    s_lo = np.linspace(0.0, threshold, 201)
    s_hi = np.linspace(threshold, 1.0, 201)
    best, best_err = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = np.trapezoid(1 - (1 - s_lo**rows) ** bands, s_lo)
            fn = np.trapezoid((1 - s_hi**rows) ** bands, s_hi)
            if fp + fn < best_err:
                best, best_err = (bands, rows), fp + fn
    return best


class NearDupIndex:
    """LSH index of kept files' signatures. It only proposes candidates (files sharing a whole
    band whose estimated similarity is near the threshold); the caller confirms each one with
    the exact `jaccard`, so the MinHash estimation error never decides on its own."""

    def __init__(self, threshold: float, num_perm: int = NUM_PERM):
        self.threshold = threshold
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self.signatures: list[np.ndarray] = []

    def _keys(self, sig: np.ndarray) -> list[bytes]:
        r = self.rows
        return [sig[i * r:(i + 1) * r].tobytes() for i in range(self.bands)]

    def candidates(self, sig: np.ndarray, margin: float = 0.1, limit: int = 8) -> list[int]:
        """Indices of kept files sharing a band with `sig` whose estimate is at least
        threshold - margin (the estimate's error at 128 functions is a few hundredths), best first."""
        found = sorted({j for bucket, key in zip(self.buckets, self._keys(sig)) for j in bucket.get(key, ())})
        scored = [(jaccard_estimate(sig, self.signatures[j]), j) for j in found]
        scored = sorted((-est, j) for est, j in scored if est >= self.threshold - margin)
        return [j for _, j in scored[:limit]]

    def add(self, sig: np.ndarray) -> int:
        index = len(self.signatures)
        self.signatures.append(sig)
        for bucket, key in zip(self.buckets, self._keys(sig)):
            bucket.setdefault(key, []).append(index)
        return index
