"""Fill-in-the-middle: the DeepSeek sentinels and the prefix-suffix-middle transform, per document,
per packed window, or per window cut at line boundaries of the text (see `dsv3.data.packing`).

Why a text-level cut: the embedded tokenizer merges a line's newline with the characters before it
(`):Ċ`, `')Ċ`: 200 of the 312 newline tokens of `json/decoder.py`), so a cut between two tokens of a
whole-file tokenization never ends a middle just before its newline. An editor's single-line infill
does exactly that: prefix up to the line, middle = the line tokenized on its own (ending `):`), suffix
from the newline on (a bare `Ċ`). Trained only on token-level cuts, the default model gave the right
held-out line 3.10 nats/token after a FIM prompt against 2.66 after the prefix alone, and filled 0 of
200 lines. `cut_lines` + `fim_lines_context` cut the decoded text at a line (or from a cursor to its end)
and tokenize the three parts apart, exactly as `/v1/completions` with a `suffix` builds its prompt. (A
line-level stage on that model: docs/pretrain.md, "Infilling".)"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from dsv3.data.shards import DataError

if TYPE_CHECKING:
    from dsv3.io.tokenizer import Tokenizer

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


def _each_piece(window: np.ndarray, rng: np.random.Generator, rate: float, eos_id: int, bos_id: int | None,
                rewrite) -> np.ndarray:
    """Split `window` after every EOS; with probability `rate` a piece's body (without its leading BOS and trailing
    EOS, two or more tokens) and tail go through `rewrite(body, tail) -> replacement or None`; BOS stays first."""
    pieces = []
    for piece in np.split(window, np.flatnonzero(window == eos_id) + 1):
        head = 1 if len(piece) and bos_id is not None and piece[0] == bos_id else 0
        tail = piece[len(piece) - 1:] if len(piece) and piece[-1] == eos_id else piece[:0]
        body = piece[head:len(piece) - len(tail)]
        if len(body) >= 2 and rng.random() < rate:
            new = rewrite(body, tail)
            if new is not None:
                piece = np.concatenate([piece[:head], new])
        pieces.append(piece)
    return np.concatenate(pieces).astype(np.int64)


def fim_context(window: np.ndarray, rng: np.random.Generator, rate: float, fim: FIMTokens, eos_id: int,
                bos_id: int | None) -> np.ndarray:
    """Context-level FIM: each piece of `window` (split after every EOS; BOS and EOS stay in place)
    becomes prefix-suffix-middle with probability `rate`; the result is cut to the window's length."""
    out = _each_piece(window, rng, rate, eos_id, bos_id, lambda body, tail: np.concatenate([fim_transform(body, rng, fim), tail]))
    return out[:len(window)]


def cut_lines(text: str, rng: np.random.Generator, max_lines: int = 4, multi_share: float = 0.15,
              rest_share: float = 0.15) -> tuple[str, str, str] | None:
    """(prefix, middle, suffix) of `text` as a cursor in an editor cuts it. Mostly one whole line: the middle
    is a non-blank line without its newline, the prefix ends with the newline before it and the suffix starts
    with the one after it (the layout of a single-line infill request). A `multi_share` of cuts take 2 to
    `max_lines` lines (ending on a non-blank one), a `rest_share` the rest of a line from a cursor inside it
    (past its indentation). None when the text has no non-blank line.

    Spans cut at two random points inside a line were tried first (a quarter of cuts): their middles are mostly
    a few characters of punctuation (`"` of a docstring's quotes, the end of a name), and the model trained on
    them answered whole held-out lines with a few characters and EOS (0 of 200 exact)."""
    lines = text.split("\n")
    starts = np.cumsum([0] + [len(x) + 1 for x in lines[:-1]])
    cands = [i for i, x in enumerate(lines) if x.strip()]
    if not cands:
        return None
    i = cands[int(rng.integers(len(cands)))]
    mode = rng.random()
    if mode < rest_share:
        line, s = lines[i], int(starts[i])
        indent = len(line) - len(line.lstrip())
        a = int(rng.integers(indent, len(line)))  # the middle is line[a:], never empty
        return text[:s + a], line[a:], text[s + len(line):]
    n = int(rng.integers(2, max_lines + 1)) if mode < rest_share + multi_share else 1
    j = min(len(lines), i + n)
    while j - 1 > i and not lines[j - 1].strip():  # the middle ends on a non-blank line
        j -= 1
    s, e = int(starts[i]), int(starts[j - 1]) + len(lines[j - 1])
    return text[:s], text[s:e], text[e:]


def fim_lines_context(window: np.ndarray, rng: np.random.Generator, rate: float, fim: FIMTokens, eos_id: int,
                      bos_id: int | None, tok: "Tokenizer") -> np.ndarray:
    """Line-level FIM: like `fim_context`, but each chosen piece is decoded, cut by `cut_lines` and its prefix,
    suffix and middle tokenized apart: `begin prefix hole suffix end middle EOS`, so the model learns to close a
    middle (an infill request stops at that EOS). A piece keeps its length: the three sentinels and the EOS are
    made room for by dropping the suffix's far end (then the prefix's start), as an editor's context budget does;
    a piece re-tokenized shorter is padded with EOS (whose labels the packer ignores)."""
    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    def rewrite(body: np.ndarray, tail: np.ndarray) -> np.ndarray | None:
        cut = cut_lines(tok.decode(body.tolist(), skip_special_tokens=False), rng)
        room = len(body) + len(tail)
        budget = room - 4  # begin, hole, end, EOS
        if cut is None or len(mid := encode(cut[1])) > budget // 2:
            return None
        pre, suf = encode(cut[0]), encode(cut[2])
        over = len(pre) + len(suf) + len(mid) - budget
        if over > 0:
            drop = min(over, len(suf))
            suf, over = suf[:len(suf) - drop], over - drop
            pre = pre[over:] if over > 0 else pre
        new = [fim.begin, *pre, fim.hole, *suf, fim.end, *mid, eos_id]
        return np.array(new + [eos_id] * (room - len(new)), dtype=np.int64)

    return _each_piece(window, rng, rate, eos_id, bos_id, rewrite)
