"""Bits per byte of held-out files: the model's code length next to `xz -9e`'s.

Bits per byte does not depend on the tokenizer, so it compares a language model with a general
compressor: the model "compresses" a file to -log2 p(file) bits (every token scored once, EOS
included, each with up to `window - stride` tokens of context), xz to its output size.
"""

from __future__ import annotations

import functools
import lzma
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm

from dsv3.eval.windows import token_windows

Scorer = Callable[[list[int]], Sequence[float]]  # log p(seq[i] | seq[:i]) for i = 1 .. len - 1


@dataclass
class Doc:
    """One held-out file: its manifest path, UTF-8 size, and its tokens as the shards hold them (EOS last)."""

    path: str
    nbytes: int
    ids: list[int]
    data: bytes


@functools.lru_cache(maxsize=None)  # each call sets up xz -9e's 674 MiB encoder: compress each text once
def xz_size(data: bytes) -> int:
    """Size of `xz -9e` output (the .xz container, CRC64), as the command-line tool writes it."""
    return len(lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9 | lzma.PRESET_EXTREME))


def encode_file(tok, text: str) -> list[int]:
    """Token ids of a file's text plus EOS; special-token spellings inside the text stay plain text, as in the shards."""
    backend = tok.backend
    before = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        ids = backend.encode(text, add_special_tokens=False).ids
    finally:
        backend.encode_special_tokens = before
    return ids + [tok.eos_token_id]


def load_docs(tok, files: list[tuple[str, Path]]) -> list[Doc]:
    out = []
    for rel, path in files:
        data = path.read_bytes()
        out.append(Doc(rel, len(data), encode_file(tok, data.decode("utf-8")), data))
    return out


def model_bits(score: Scorer, doc: Doc, bos_id: int, window: int, stride: int) -> float:
    """-log2 p(doc) under the model, scoring each token once in sliding windows that start with BOS."""
    nll = 0.0
    for seq, k in token_windows(doc.ids, bos_id, window, stride):
        lps = score(seq)
        nll -= sum(lps[len(lps) - k:])
    return nll / math.log(2)


def in_subset(path: str, subset: str) -> bool:
    return subset in path.split("/")


def summarize(docs: list[Doc], bits: list[float], subset: str | None = None) -> dict:
    """Model bits/byte, xz -9e per file (summed) and on the concatenation, over all docs or a path subset."""
    pick = [i for i, d in enumerate(docs) if subset is None or in_subset(d.path, subset)]
    if not pick:
        return {"files": 0}
    nbytes = sum(docs[i].nbytes for i in pick)
    ntok = sum(len(docs[i].ids) for i in pick)
    xz_files = sum(xz_size(docs[i].data) for i in pick)
    xz_cat = xz_size(b"".join(docs[i].data for i in pick))
    total = sum(bits[i] for i in pick)
    return {"files": len(pick), "bytes": nbytes, "tokens": ntok, "model_bits_per_byte": total / nbytes,
            "model_bits_per_token": total / ntok, "bytes_per_token": nbytes / ntok,
            "xz_bits_per_byte_per_file": 8 * xz_files / nbytes, "xz_bits_per_byte_concat": 8 * xz_cat / nbytes}


def evaluate(score: Scorer, docs: list[Doc], bos_id: int, window: int, stride: int, subset: str = "stdlib",
             progress: bool = True) -> dict:
    bits = []
    for doc in tqdm(docs, desc="bits/byte", unit="file", disable=not progress):
        bits.append(model_bits(score, doc, bos_id, window, stride))
    worst = sorted(range(len(docs)), key=lambda i: -bits[i] / docs[i].nbytes)[:5]
    return {"window": window, "stride": stride, "all": summarize(docs, bits), subset: summarize(docs, bits, subset),
            "worst_files": [{"path": docs[i].path, "bits_per_byte": bits[i] / docs[i].nbytes} for i in worst]}
