"""ModelRunner: owns the paged latent cache and turns a scheduled step into model inputs and logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3.engine.paged_attention import LatentCache, PagedContext, PrefillChunk
from dsv3.lora.apply import lora_modules, set_slot_ids
from dsv3.lora.slots import SlotBatch
from dsv3.models.deepseek_v3 import DeepseekV3ForCausalLM


@dataclass
class StepItem:
    """A run of consecutive tokens of one sequence to compute in this step."""

    token_ids: list[int]
    start: int  # position of the first token
    block_table: list[int]
    sample: bool = False  # logits of the last token are needed
    all_logits: bool = False  # logits of every token are needed (speculative verification)
    adapter: int = 0  # LoRA adapter id: 0 = the base model, k = stacked slot k - 1


class ModelRunner:
    def __init__(self, model: DeepseekV3ForCausalLM, num_blocks: int, block_size: int, kv_cache_dtype: str = "auto"):
        cfg = model.config
        self.model, self.block_size = model, block_size
        self.device = model.device
        self.cache = LatentCache(cfg.num_hidden_layers + len(model.model.mtp), num_blocks, block_size, cfg.latent_dim,
                                 cfg.kv_lora_rank, model.dtype, self.device, quantized=kv_cache_dtype == "int8")
        self.multi_lora = bool(lora_modules(model))  # stacked adapters (dsv3.lora.load_stacked): slots per token

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Cache slots of positions [start, end) of a sequence."""
        pos = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.long)
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.device)

    def prepare(self, items: list[StepItem], lora: bool = True) -> tuple[torch.Tensor, torch.Tensor, PagedContext, list[int]]:
        """Flatten the step into (input_ids [1, N], positions [1, N], context, rows whose logits are needed).

        With stacked adapters (and `lora`), every LoRA linear gets one slot per token of the flat batch,
        and the context one per decode row and per prefill chunk (MLA applies kv_b_proj's per slot).
        """
        bs, dev = self.block_size, self.device
        lora = lora and self.multi_lora
        ids, pos, slot_mapping, prefills, rows = [], [], [], [], []
        decode_rows, decode_tables, decode_lens = [], [], []
        token_adapters, decode_adapters = [], []
        offset = 0
        for it in items:
            s, n, table = it.start, len(it.token_ids), it.block_table
            ids.extend(it.token_ids)
            pos.extend(range(s, s + n))
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(s, s + n))
            if lora:
                token_adapters.extend([it.adapter - 1] * n)
            if n == 1 and s > 0:
                decode_rows.append(offset)
                decode_tables.append(table[: s // bs + 1])
                decode_lens.append(s + 1)
                decode_adapters.append(it.adapter - 1)
            else:
                prefills.append(PrefillChunk(slice(offset, offset + n), self.slots(table, 0, s + n), s,
                                             SlotBatch([it.adapter - 1]) if lora else None))
            if it.all_logits:
                rows.extend(range(offset, offset + n))
            elif it.sample:
                rows.append(offset + n - 1)
            offset += n
        # Decode contexts: one padded block-table tensor turned into slots and a validity mask in two ops.
        width = max((len(t) for t in decode_tables), default=0)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], dtype=torch.long).view(len(decode_tables), width)
        decode_slots = (tables[:, :, None] * bs + torch.arange(bs)).flatten(1).to(dev)
        decode_mask = (torch.arange(width * bs)[None] < torch.tensor(decode_lens, dtype=torch.long)[:, None]).to(dev)
        ctx = PagedContext(self.cache, torch.tensor(slot_mapping, dtype=torch.long, device=dev),
                           torch.tensor(decode_rows, dtype=torch.long, device=dev), decode_slots, decode_mask[:, None, None], prefills,
                           SlotBatch(decode_adapters) if lora and decode_adapters else None)
        if lora:
            set_slot_ids(self.model, SlotBatch(token_adapters))
        return (torch.tensor([ids], device=dev), torch.tensor([pos], device=dev), ctx, rows)

    @torch.inference_mode()
    def execute(self, items: list[StepItem]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the main model: (hidden states [N, D] of every token, fp32 logits of the requested rows)."""
        input_ids, positions, ctx, rows = self.prepare(items)
        try:
            hidden, logits = self.model.step(input_ids, positions, ctx, rows)
        finally:
            if self.multi_lora:  # other users of the model (LLM.score, the generator) see the base model
                set_slot_ids(self.model, None)
        return hidden, logits.float()

    @torch.inference_mode()
    def execute_mtp(self, items: list[StepItem], hidden_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run MTP module 0 on (hidden_in [N, D], the items' tokens): (its hidden states, logits of requested rows).

        The MTP module carries no adapters (PEFT's view of the model has none); it drafts on the adapted
        model's hidden states and the adapted main model verifies, so outputs stay exact.
        """
        input_ids, positions, ctx, rows = self.prepare(items, lora=False)
        hidden = self.model.mtp_hidden(hidden_in[None], input_ids, positions, ctx)[0]
        return hidden, self.model.lm_head(hidden[rows]).float()
