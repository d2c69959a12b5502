"""Perplexity and bits per byte of text files.

Bits per byte is the number to compare across models: unlike token perplexity it does not
depend on the tokenizer, so a model with a larger vocabulary is not rewarded for predicting
fewer, longer tokens. Word and byte perplexity follow lm-eval's `wikitext` task; token
perplexity is kept for comparison with training logs.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

from dsv3.eval.backends import Backend
from dsv3.eval.data import DataError, require_file
from dsv3.eval.report import Metric, TaskResult


def load_texts(paths: Sequence[str | Path]) -> list[tuple[Path, str]]:
    if not paths:
        raise DataError("perplexity needs at least one text file (--data FILE ...).")
    out = []
    for path in paths:
        p = require_file(path, "text")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text (byte {e.start}).") from None
        if not text.strip():
            raise DataError(f"{p}: is empty.")
        out.append((p, text))
    return out


def summarize(logprob: float, tokens: int, text_bytes: int, words: int) -> dict[str, Metric]:
    """Corpus-level metrics from a summed natural-log likelihood."""
    nll = -logprob
    bpb = nll / (text_bytes * math.log(2))
    return {
        "bits_per_byte": Metric(bpb, math.nan, text_bytes),
        "byte_perplexity": Metric(2.0 ** bpb, math.nan, text_bytes),
        "word_perplexity": Metric(math.exp(min(nll / words, 700.0)), math.nan, words),
        "token_perplexity": Metric(math.exp(min(nll / max(tokens, 1), 700.0)), math.nan, tokens),
    }


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))  # lm-eval wikitext's word count


def evaluate(backend: Backend, paths: Sequence[str | Path], window: int = 2048, stride: int | None = None,
             limit: int | None = None) -> TaskResult:
    """Score each file in sliding windows; report per-file and corpus (token-weighted) metrics."""
    texts = load_texts(paths)[:limit]
    stride = stride or window // 2
    if window < 2 or stride < 1:
        raise DataError(f"--window must be >= 2 and --stride >= 1, got {window} and {stride}.")
    scores = backend.rolling_loglikelihood([t for _, t in texts], window, stride)
    groups = {}
    total_lp = total_tokens = total_bytes = total_words = 0
    for (p, text), s in zip(texts, scores):
        nbytes, nwords = len(text.encode("utf-8")), count_words(text)
        groups[f"file/{p.name}"] = summarize(s.logprob, s.tokens, nbytes, nwords)
        total_lp += s.logprob
        total_tokens += s.tokens
        total_bytes += nbytes
        total_words += nwords
    config = {"files": [str(p) for p, _ in texts], "window": window, "stride": stride}
    return TaskResult("perplexity", backend.name, type(backend).__name__,
                      summarize(total_lp, total_tokens, total_bytes, total_words), "bits_per_byte", config,
                      groups=groups)
