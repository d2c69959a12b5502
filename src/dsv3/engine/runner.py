"""ModelRunner: owns the paged latent cache and turns a scheduled step into model inputs and logits."""

from __future__ import annotations

import torch

from dsv3.engine.paged_attention import LatentCache, PagedContext, PrefillChunk
from dsv3.engine.scheduler import ScheduledChunk
from dsv3.model import DeepseekV3ForCausalLM


class ModelRunner:
    def __init__(self, model: DeepseekV3ForCausalLM, num_blocks: int, block_size: int, kv_cache_dtype: str = "auto"):
        cfg = model.config
        self.model, self.block_size = model, block_size
        self.device = model.device
        self.cache = LatentCache(cfg.num_hidden_layers + len(model.model.mtp), num_blocks, block_size, cfg.latent_dim,
                                 cfg.kv_lora_rank, model.dtype, self.device, quantized=kv_cache_dtype == "int8")

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Cache slots of positions [start, end) of a sequence."""
        pos = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.long)
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.device)

    def prepare(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor, PagedContext, list[int]]:
        """Flatten the step into (input_ids [1, N], positions [1, N], context, rows whose logits are needed)."""
        ids, pos, slot_parts, prefills, decode_rows, decode_ctx, sample_rows = [], [], [], [], [], [], []
        offset = 0
        for c in chunks:
            s, n = c.start, c.num_tokens
            ids.extend(c.seq.token_ids[s:s + n])
            pos.extend(range(s, s + n))
            slot_parts.append(self.slots(c.seq.block_table, s, s + n))
            if n == 1 and s > 0:
                decode_rows.append(offset)
                decode_ctx.append(self.slots(c.seq.block_table, 0, s + 1))
            else:
                prefills.append(PrefillChunk(slice(offset, offset + n), self.slots(c.seq.block_table, 0, s + n), s))
            offset += n
            if c.completes:
                sample_rows.append(offset - 1)
        dev = self.device
        if decode_ctx:
            longest = max(len(x) for x in decode_ctx)
            decode_slots = torch.zeros(len(decode_ctx), longest, dtype=torch.long, device=dev)
            decode_mask = torch.zeros(len(decode_ctx), 1, 1, longest, dtype=torch.bool, device=dev)
            for i, x in enumerate(decode_ctx):
                decode_slots[i, : len(x)] = x
                decode_mask[i, ..., : len(x)] = True
        else:
            decode_slots = torch.zeros(0, 0, dtype=torch.long, device=dev)
            decode_mask = torch.zeros(0, 1, 1, 0, dtype=torch.bool, device=dev)
        ctx = PagedContext(self.cache, torch.cat(slot_parts), torch.tensor(decode_rows, dtype=torch.long, device=dev),
                           decode_slots, decode_mask, prefills)
        return (torch.tensor([ids], device=dev), torch.tensor([pos], device=dev), ctx, sample_rows)

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one step: (hidden states [N, D] of every scheduled token, fp32 logits [rows, V] of the
        last token of each chunk that completes its sequence)."""
        input_ids, positions, ctx, rows = self.prepare(chunks)
        hidden = self.model.hidden_states(input_ids, positions, ctx)[0]
        return hidden, self.model.lm_head(hidden[rows]).float()
