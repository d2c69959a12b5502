"""Step metadata: what one engine step's attention needs to know, built once per step by the engine.

A step is a flat batch of tokens from many sequences -- decodes and prefill chunks mixed. For every
token: the cache slot its entry is written to (`slot_mapping`); for the decode tokens: the slots
they read (`decode_slots`, padded, with `decode_mask`); for each prefill chunk: its place in the
batch, the slots of its context, and where it starts. Sequences name their slots through a block
table (vLLM's layout): position p of a sequence lives in slot block_table[p // block_size] ·
block_size + p % block_size. Every layer reads the same slots of its own cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_NATIVE_TOKENS = 8  # steps up to this many tokens get a layout for the native MLA kernel (= dsv3.ops.MAX_ROWS)
MAX_NATIVE_DECODES = 256  # pure decode steps up to this many tokens get one too (= dsv3.ops.BATCH_ROWS)


@dataclass
class PrefillChunk:
    token_slice: slice  # this chunk's tokens within the flat step batch
    context_slots: torch.Tensor  # slots of positions [0, start + n)
    start: int
    adapter: list[int] | None = None  # [the sequence's LoRA slot] when the model serves several adapters


@dataclass
class StepMetadata:
    slot_mapping: torch.Tensor  # [N] int64
    decode_tokens: torch.Tensor  # [Nd] rows of the flat batch that decode
    decode_slots: torch.Tensor  # [Nd, S] slots each decode token reads (padded)
    decode_mask: torch.Tensor  # [Nd, 1, 1, S] bool: which of them are real
    prefills: list[PrefillChunk] = field(default_factory=list)
    decode_adapters: list[int] | None = None  # LoRA slot per decode row, or None
    decode_lens: torch.Tensor | None = None  # [Nd] int64: how many of its decode_slots each decode token reads

    @classmethod
    def build(cls, sequences: list[tuple[int, int, list[int], int]], block_size: int, device: torch.device,
              adapters: list[int] | None = None) -> "StepMetadata":
        """From (start, num_tokens, block_table, offset in the flat batch) per sequence of the step; `adapters`:
        each sequence's LoRA slot (-1: the base model) when the model serves several adapters (the layers take a
        list of slots per row, `dsv3.lora.slots.as_slot_batch`)."""
        bs = block_size
        slot_mapping, prefills = [], []
        decode_rows, decode_tables, decode_lens, decode_adapters = [], [], [], []
        for k, (s, n, table, offset) in enumerate(sequences):
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(s, s + n))
            if n == 1 and s > 0:
                decode_rows.append(offset)
                decode_tables.append(table[: s // bs + 1])
                decode_lens.append(s + 1)
                decode_adapters.append(adapters[k] if adapters is not None else None)
            else:
                pos = torch.arange(0, s + n)
                t = torch.tensor(table, dtype=torch.long)
                context = (t[pos // bs] * bs + pos % bs).to(device)
                prefills.append(PrefillChunk(slice(offset, offset + n), context, s,
                                             [adapters[k]] if adapters is not None else None))
        # Decode contexts: one padded block-table tensor turned into slots and a validity mask in two ops.
        width = max((len(t) for t in decode_tables), default=0)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], dtype=torch.long).view(len(decode_tables), width)
        decode_slots = (tables[:, :, None] * bs + torch.arange(bs)).flatten(1).to(device)
        lens = torch.tensor(decode_lens, dtype=torch.long)
        decode_mask = (torch.arange(width * bs)[None] < lens[:, None]).to(device)
        return cls(torch.tensor(slot_mapping, dtype=torch.long, device=device),
                   torch.tensor(decode_rows, dtype=torch.long, device=device), decode_slots, decode_mask[:, None, None],
                   prefills, decode_adapters if adapters is not None and decode_adapters else None,
                   lens.to(device))

    def native_layout(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(key_slots [N, S], key_mask [N, S]) per token for the native MLA kernel, or None.

        Steps of at most MAX_NATIVE_TOKENS tokens qualify: decodes, and the short chunks of speculative
        verification and MTP drafting (token t of a chunk starting at `start` sees slots [0, start + t]);
        pure decode steps up to MAX_NATIVE_DECODES (a batched decode). Not with LoRA adapters."""
        n = self.slot_mapping.numel()
        limit = MAX_NATIVE_TOKENS if self.prefills else MAX_NATIVE_DECODES
        if (n == 0 or n > limit or self.decode_adapters is not None or not self.slot_mapping.is_cpu
                or any(p.adapter is not None for p in self.prefills)):
            return None
        if not self.prefills:  # a pure decode step: rows are the tokens, in order
            return self.decode_slots, self.decode_mask[:, 0, 0]
        width = max([self.decode_slots.shape[1]] + [p.start + p.token_slice.stop - p.token_slice.start for p in self.prefills])
        slots = torch.zeros(n, width, dtype=torch.long)
        mask = torch.zeros(n, width, dtype=torch.bool)
        for j, t in enumerate(self.decode_tokens.tolist()):
            slots[t, : self.decode_slots.shape[1]] = self.decode_slots[j]
            mask[t, : self.decode_slots.shape[1]] = self.decode_mask[j, 0, 0]
        for p in self.prefills:
            for i, t in enumerate(range(p.token_slice.start, p.token_slice.stop)):
                slots[t, : p.start + i + 1] = p.context_slots[: p.start + i + 1]
                mask[t, : p.start + i + 1] = True
        return slots, mask
