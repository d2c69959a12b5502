"""Strict UTF-8 for grammar-constrained sampling.

A byte-level vocabulary spells a character over several tokens, and xgrammar accepts any byte
sequence of the right shape as a character — UTF-8-encoded surrogates (ED A0..BF ..) included,
which no decoder accepts: they come out as three U+FFFD, so a `maxLength: 6` string of six
characters decodes to eight. This mask forbids, after the bytes generated so far, every token
that would make them invalid UTF-8 (surrogates, overlong forms, code points past U+10FFFF, stray
continuation bytes), with the standard decoder's state machine.
"""

from __future__ import annotations

import torch

ACCEPT, ERROR = 0, -1
# state -> (bytes still needed, allowed range of the next byte); ACCEPT: between characters
_CONT = {1: (1, 0x80, 0xBF), 2: (2, 0x80, 0xBF), 3: (2, 0xA0, 0xBF), 4: (2, 0x80, 0x9F),
         5: (3, 0x80, 0xBF), 6: (3, 0x90, 0xBF), 7: (3, 0x80, 0x8F)}
_AFTER = {1: ACCEPT, 2: 1, 3: 1, 4: 1, 5: 2, 6: 2, 7: 2}  # state after one good continuation byte


def step(state: int, byte: int) -> int:
    """The decoder state after `byte` (ERROR if the sequence is invalid)."""
    if state == ACCEPT:
        if byte < 0x80:
            return ACCEPT
        if 0xC2 <= byte <= 0xDF:
            return 1
        if byte == 0xE0:
            return 3
        if byte == 0xED:
            return 4  # the next byte must stay below A0: ED A0..BF would encode a surrogate
        if 0xE1 <= byte <= 0xEF:
            return 2
        if byte == 0xF0:
            return 6
        if 0xF1 <= byte <= 0xF3:
            return 5
        if byte == 0xF4:
            return 7
        return ERROR
    _, lo, hi = _CONT[state]
    return _AFTER[state] if lo <= byte <= hi else ERROR


def run(state: int, data: bytes) -> int:
    for b in data:
        state = step(state, b)
        if state == ERROR:
            break
    return state


def tail_state(vocab: list[bytes], token_ids: list[int]) -> int:
    """The decoder state after the generated tokens (only their last few bytes matter)."""
    tail = b""
    for t in reversed(token_ids):
        tail = (vocab[t] if t < len(vocab) else b"") + tail
        if len(tail) >= 4:
            break
    start = max(len(tail) - 3, 0)  # a character is at most 4 bytes: begin at its lead byte
    for i in range(len(tail) - 1, start - 1, -1):
        if not 0x80 <= tail[i] <= 0xBF:
            start = i
            break
    state = run(ACCEPT, tail[start:])
    return ACCEPT if state == ERROR else state


class Utf8Masks:
    """Per decoder state, the tokens whose bytes keep the output valid UTF-8 (built on first use)."""

    def __init__(self, vocab: list[bytes], vocab_size: int):
        self.vocab, self.vocab_size = vocab, vocab_size
        self._ok: dict[int, torch.Tensor] = {}

    def allowed(self, state: int) -> torch.Tensor:
        ok = self._ok.get(state)
        if ok is None:
            ok = torch.zeros(self.vocab_size, dtype=torch.bool)
            ok[: len(self.vocab)] = torch.tensor([run(state, v) != ERROR for v in self.vocab[: self.vocab_size]])
            self._ok[state] = ok
        return ok
