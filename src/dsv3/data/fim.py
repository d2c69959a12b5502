"""Fill-in-the-middle: the DeepSeek sentinels and the prefix-suffix-middle transform, per document
or per packed window (see `dsv3.data.packing` for when each is used)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dsv3.data.shards import DataError

FIM_BEGIN, FIM_HOLE, FIM_END = "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"


class FIMTokens(NamedTuple):
    """Ids of `<｜fim▁begin｜>`, `<｜fim▁hole｜>` and `<｜fim▁end｜>`."""
    begin: int
    hole: int
    end: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "FIMTokens":
        """Look the DeepSeek sentinels up in anything with `token_to_id` (a `tokenizers.Tokenizer`)."""
        ids = [tokenizer.token_to_id(t) for t in (FIM_BEGIN, FIM_HOLE, FIM_END)]
        if None in ids:
            raise DataError(f"the tokenizer lacks the FIM token {(FIM_BEGIN, FIM_HOLE, FIM_END)[ids.index(None)]}.")
        return cls(*ids)


def fim_transform(tokens: np.ndarray, rng: np.random.Generator, fim: FIMTokens) -> np.ndarray:
    """Prefix-suffix-middle: `begin prefix hole suffix end middle`, cut at two random points
    of the document's tokens (EOS excluded), as in DeepSeek-Coder."""
    lo, hi = np.sort(rng.integers(0, len(tokens) + 1, size=2))
    return np.concatenate([[fim.begin], tokens[:lo], [fim.hole], tokens[hi:], [fim.end], tokens[lo:hi]]).astype(np.int64)


def fim_context(window: np.ndarray, rng: np.random.Generator, rate: float, fim: FIMTokens, eos_id: int,
                bos_id: int | None) -> np.ndarray:
    """Context-level FIM: each piece of `window` (split after every EOS; BOS and EOS stay in place)
    becomes prefix-suffix-middle with probability `rate`; the result is cut to the window's length."""
    pieces = []
    for piece in np.split(window, np.flatnonzero(window == eos_id) + 1):
        head = 1 if len(piece) and bos_id is not None and piece[0] == bos_id else 0
        tail = 1 if len(piece) and piece[-1] == eos_id else 0
        body = piece[head:len(piece) - tail]
        if len(body) >= 2 and rng.random() < rate:
            piece = np.concatenate([piece[:head], fim_transform(body, rng, fim), piece[len(piece) - tail:]])
        pieces.append(piece)
    return np.concatenate(pieces)[:len(window)].astype(np.int64)
