"""Sliding windows for scoring texts longer than the model's context.

A long file cannot be fed in one piece, and cutting it into disjoint pieces makes the first
tokens of every piece be predicted from almost nothing. Overlapping windows give each scored
token up to `window - stride` tokens of real context while every token is still scored
exactly once. With `stride = window - 1` this is lm-evaluation-harness's
`get_rolling_token_windows(..., context_len=1)`.
"""

from __future__ import annotations

from typing import Iterator


def token_windows(ids: list[int], prefix_token: int, window: int, stride: int) -> Iterator[tuple[list[int], int]]:
    """Yield (sequence, k): score the last k tokens of `sequence`; each token of `ids` is scored once.

    The first window starts with `prefix_token` (BOS) so the first real token is predicted too.
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    stride = max(1, min(stride, window - 1))
    if not ids:
        return
    first = [prefix_token] + ids[:window - 1]
    yield first, len(first) - 1
    done = len(first) - 1
    while done < len(ids):
        end = min(done + stride, len(ids))
        yield ids[end - window:end] if end >= window else ids[:end], end - done
        done = end


def text_windows(text: str, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Character windows (start, score_from, end) for servers whose tokenizer we cannot see.

    Window ends are moved back to whitespace so no word is split between two requests; each
    token is then counted in exactly the window whose scored span [score_from, end) holds its start.
    """
    n = len(text)
    if n == 0:
        return []
    stride = max(1, min(stride, window))

    def snap(pos: int, floor: int) -> int:
        if pos >= n:
            return n
        for i in range(pos, max(floor, pos - 256), -1):
            if text[i].isspace():
                return i
        return pos

    end = snap(min(window, n), 0)
    out = [(0, 0, end)]
    while end < n:
        new_end = snap(min(end + stride, n), end)
        start = max(0, new_end - window)
        out.append((start, end, new_end))
        end = new_end
    return out
