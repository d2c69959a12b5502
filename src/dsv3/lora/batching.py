"""Packing examples into rows and rows into tensors, without any leak between packed examples.

Best-fit-decreasing packing (TRL's default `bfd`) fills rows of `max_seq_len` tokens. Each example
keeps its own positions (restarting at 0) and a document id; attention is restricted to the same
document through `AttentionContext.causal(doc_ids=...)`, and a target is only set where the next
token belongs to the same example and is a response token.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import torch

from dsv3.lora.data import Example

IGNORE = -100


def pack_bfd(examples: Sequence[Example], max_len: int) -> list[list[Example]]:
    """Best-fit decreasing: longest first, each into the fullest row that still has room."""
    rows: list[list[Example]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for ex in sorted(examples, key=lambda e: -len(e.ids)):
        n = len(ex.ids)
        i = bisect.bisect_left(free, (n, -1))
        if i < len(free):
            room, r = free.pop(i)
            rows[r].append(ex)
            bisect.insort(free, (room - n, r))
        else:
            rows.append([ex])
            bisect.insort(free, (max_len - n, len(rows) - 1))
    return rows


def collate(rows: Sequence[Sequence[Example]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Rows of examples -> input_ids, targets (IGNORE where no loss), positions, doc_ids; all [B, T]."""
    T = max(sum(len(e.ids) for e in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    docs = torch.full((B, T), -1, dtype=torch.long)  # padding is its own "document"
    for b, row in enumerate(rows):
        start = 0
        for d, ex in enumerate(row):
            n = len(ex.ids)
            x = torch.tensor(ex.ids)
            m = torch.tensor(ex.mask, dtype=torch.bool)
            ids[b, start:start + n] = x
            positions[b, start:start + n] = torch.arange(n)
            docs[b, start:start + n] = d
            tgt = torch.where(m[1:], x[1:], torch.full_like(x[1:], IGNORE))
            targets[b, start:start + n - 1] = tgt
            start += n
    return {"input_ids": ids, "targets": targets, "positions": positions, "doc_ids": docs}
