"""Which adapter each row of a batch uses, grouped by adapter once per step (multi-LoRA serving).

A batch of requests for different adapters runs through every adapted linear once: the rows of each
adapter are gathered, multiplied by that adapter's A and B, and added back (Punica's SGMV, written as
one pair of matmuls per adapter present). Grouping needs the ids on the host; doing it once per step
and sharing the result across all layers keeps the per-layer cost to gathers and matmuls, with no
host round-trip per layer.
"""

from __future__ import annotations

import torch


class SlotBatch:
    """Adapter slot per row (-1 = the base model), per sequence ([B]) or per token ([N])."""

    def __init__(self, ids: torch.Tensor | list[int]):
        self.ids = torch.as_tensor(ids, dtype=torch.long).flatten().cpu()
        if self.ids.numel() == 0:
            raise ValueError("a SlotBatch needs at least one row")
        self._groups: dict[tuple[int, torch.device], list[tuple[int, torch.Tensor | None]]] = {}

    def __len__(self) -> int:
        return self.ids.numel()

    def row_ids(self, rows: int) -> torch.Tensor:
        """The slot of each of `rows` rows: per-sequence ids repeat over the sequence's tokens ([B, T] flattened)."""
        n = self.ids.numel()
        if rows == n:
            return self.ids
        if rows % n:
            raise ValueError(f"{rows} rows cannot be split among {n} adapter slot ids")
        return self.ids.repeat_interleave(rows // n)

    def groups(self, rows: int, device: torch.device | str) -> list[tuple[int, torch.Tensor | None]]:
        """(slot, row indices on `device`) per adapter present; None = every row. Base rows are left out."""
        key = (rows, torch.device(device))
        if key not in self._groups:
            ids = self.row_ids(rows)
            out: list[tuple[int, torch.Tensor | None]] = []
            for slot in sorted(set(ids.tolist())):
                if slot < 0:
                    continue
                sel = (ids == slot).nonzero().flatten()
                out.append((slot, None if sel.numel() == rows else sel.to(key[1])))
            self._groups[key] = out
        return self._groups[key]

    @property
    def uniform(self) -> int | None:
        """The one slot every row uses, or None for a mixed batch."""
        first = int(self.ids[0])
        return first if bool((self.ids == first).all()) else None


def as_slot_batch(slot_ids: "SlotBatch | torch.Tensor | list[int] | None") -> SlotBatch | None:
    return slot_ids if slot_ids is None or isinstance(slot_ids, SlotBatch) else SlotBatch(slot_ids)
