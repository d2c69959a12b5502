"""Memory-mapped token shards written by `dsv3 data build`.

A split (`train` or `heldout`) is a list of raw little-endian `uint16`/`uint32` files
(`train-00000.bin`, ...) described by `manifest.json`. Every document ends with the EOS id, so
document boundaries are recoverable from the tokens alone; the reader presents the shards of
one split as a single concatenated token stream without loading it into memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dsv3.errors import DSV3Error

MANIFEST = "manifest.json"
SPLITS = ("train", "heldout")


class DataError(DSV3Error):
    """A data input, tokenizer or shard directory is missing, empty or inconsistent."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of a `vocab_size` vocabulary."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def load_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} does not exist; build the shards first with `dsv3 data build`.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}).") from None


class TokenShards:
    """One split of a shard directory as a flat, memory-mapped token stream.

    Memory maps are opened lazily and dropped on pickling, so the object can be handed to
    DataLoader workers (fork or spawn) without copying the tokens.
    """

    def __init__(self, directory: str | Path, split: str = "train"):
        if split not in SPLITS:
            raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}.")
        self.directory = Path(directory)
        self.split = split
        manifest = load_manifest(self.directory)
        self.vocab_size = int(manifest["tokenizer"]["vocab_size"])
        self.eos_id = int(manifest["tokenizer"]["eos_id"])
        bos = manifest["tokenizer"].get("bos_id")  # absent in shards written before documents began with BOS
        self.bos_id = None if bos is None else int(bos)
        self.dtype = np.dtype(manifest["dtype"])
        entries = manifest["shards"].get(split, [])
        self.files = [self.directory / e["file"] for e in entries]
        self.counts = np.array([int(e["tokens"]) for e in entries], dtype=np.int64)
        if len(self.files) == 0 or self.counts.sum() == 0:
            raise DataError(f"split {split!r} of {self.directory} has no tokens.")
        for f, n in zip(self.files, self.counts):
            size = f.stat().st_size if f.is_file() else -1
            if size != n * self.dtype.itemsize:
                raise DataError(f"shard {f} should hold {n} tokens of {self.dtype.name} but is missing or truncated.")
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self._maps: list[np.memmap] | None = None
        self._bounds: tuple[np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}

    @property
    def maps(self) -> list[np.memmap]:
        if self._maps is None:
            self._maps = [np.memmap(f, dtype=self.dtype, mode="r") for f in self.files]
        return self._maps

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens `[start, start + length)` of the concatenated split, as int64."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) outside 0..{len(self)}")
        out = np.empty(length, dtype=np.int64)
        filled, pos = 0, start
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while filled < length:
            local = pos - int(self.offsets[shard])
            take = min(length - filled, int(self.counts[shard]) - local)
            out[filled:filled + take] = self.maps[shard][local:local + take]
            filled, pos, shard = filled + take, pos + take, shard + 1
        return out

    def random_window(self, length: int, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        """A uniformly placed window of `length` tokens and its start offset."""
        if length > len(self):
            raise DataError(f"a window of {length} tokens is longer than split {self.split!r} ({len(self)} tokens).")
        start = int(rng.integers(0, len(self) - length + 1))
        return start, self.window(start, length)

    def doc_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(starts, ends) of every document; `end` is exclusive and includes the EOS token."""
        if self._bounds is None:
            ends = []
            for base, mm in zip(self.offsets[:-1], self.maps):
                for lo in range(0, len(mm), 1 << 24):
                    chunk = np.asarray(mm[lo:lo + (1 << 24)])
                    ends.append(np.flatnonzero(chunk == self.eos_id) + (int(base) + lo + 1))
            end = np.concatenate(ends).astype(np.int64)
            if len(end) == 0 or end[-1] != len(self):
                raise DataError(f"split {self.split!r} of {self.directory} does not end with the EOS id {self.eos_id}.")
            self._bounds = (np.concatenate([[0], end[:-1]]).astype(np.int64), end)
        return self._bounds

    @property
    def num_docs(self) -> int:
        return len(self.doc_bounds()[0])

    def document(self, index: int) -> np.ndarray:
        """Tokens of document `index`, its trailing EOS included."""
        starts, ends = self.doc_bounds()
        return self.window(int(starts[index]), int(ends[index] - starts[index]))
