"""ModelRunner: owns the paged latent cache and turns a scheduled step into model inputs and logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dsv3 import ops
from dsv3.attention.backend import backend_for
from dsv3.attention.context import PagedContext, SequenceStates
from dsv3.attention.kv_cache import KVCache
from dsv3.attention.metadata import StepMetadata
from dsv3.engine import cuda_graphs
from dsv3.engine.sampling import greedy_choice
from dsv3.lora.apply import lora_modules, set_slot_ids
from dsv3.lora.slots import SlotBatch
from dsv3.models.interface import CausalLM


@dataclass
class StepItem:
    """A run of consecutive tokens of one sequence to compute in this step."""

    token_ids: list[int]
    start: int  # position of the first token
    block_table: list[int]
    sample: bool = False  # logits of the last token are needed
    all_logits: bool = False  # logits of every token are needed (speculative verification)
    adapter: int = 0  # LoRA adapter id: 0 = the base model, k = stacked slot k - 1
    state_slot: int = -1  # per-sequence state slot (models with `paged_state`, DeepSeek-V4)
    restore: Any = None  # such models: a saved end-of-block state the slot starts from (a prefix-cache hit)


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, kv_cache_dtype: str = "auto",
                 num_state_slots: int = 0, max_snapshots: int = 0):
        self.model, self.block_size = model, block_size
        self.device = model.device
        self.multi_lora = bool(lora_modules(model))  # stacked adapters (dsv3.lora.load_stacked): slots per token
        self.attn_backend = backend_for(self.device)  # Triton decode attention on CUDA
        self.state = None
        self.native_spec = False  # greedy speculative steps may run as one native call (`execute_spec`)
        if num_state_slots:  # the model keeps per-sequence state (DeepSeek-V4) and pages it itself
            self.state = model.paged_state(num_state_slots, num_blocks, block_size, max_snapshots)
            self.checkpoints: dict[int, tuple] = {}  # slot -> its state before this engine step (`rewind`)
            self.cache, self.graphs = None, None
            return
        extra = cuda_graphs.scratch_blocks(self.device)  # GPU: a scratch block for CUDA graphs' padded rows
        self.cache = KVCache(model.cache_specs(), (num_blocks + extra) * block_size, model.dtype, self.device,
                             quantized=kv_cache_dtype == "int8")
        self.graphs = cuda_graphs.DecodeGraphs(self, scratch_block=num_blocks) if extra else None
        self.native_spec = not self.multi_lora and self.cache.native() is not None

    def prepare(self, items: list[StepItem], lora: bool = True) -> tuple[torch.Tensor, torch.Tensor, PagedContext | SequenceStates, list[int]]:
        """Flatten the step into (input_ids [1, N], positions [1, N], context, rows whose logits are needed).

        The attention metadata is built here, once per step. With stacked adapters (and `lora`), every LoRA linear
        gets one slot per token of the flat batch, and the context one per decode row and per prefill chunk (MLA
        applies kv_b_proj's per slot).
        """
        dev = self.device
        lora = lora and self.multi_lora
        ids, pos, rows, seqs, token_adapters = [], [], [], [], []
        offset = 0
        for it in items:
            s, n = it.start, len(it.token_ids)
            ids.extend(it.token_ids)
            pos.extend(range(s, s + n))
            seqs.append((s, n, it.block_table, offset))
            if lora:
                token_adapters.extend([it.adapter - 1] * n)
            if it.all_logits:
                rows.extend(range(offset, offset + n))
            elif it.sample:
                rows.append(offset + n - 1)
            offset += n
        if self.state is not None:
            for it in items:
                if it.restore is not None:
                    self.state.load(it.state_slot, it.restore)
            ctx = SequenceStates(self.state, [it.state_slot for it in items], [it.start for it in items],
                                 [len(it.token_ids) for it in items], [it.block_table for it in items])
            return torch.tensor([ids], device=dev), torch.tensor([pos], device=dev), ctx, rows
        meta = StepMetadata.build(seqs, self.block_size, dev, [it.adapter - 1 for it in items] if lora else None)
        if lora:
            set_slot_ids(self.model, SlotBatch(token_adapters))
        ctx = PagedContext(self.cache, meta)
        ctx.backend = self.attn_backend
        return (torch.tensor([ids], device=dev), torch.tensor([pos], device=dev), ctx, rows)

    @torch.inference_mode()
    def execute(self, items: list[StepItem]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the main model: (hidden states [N, D] of every token, fp32 logits of the requested rows)."""
        if self.graphs is not None:  # a decode step replays its CUDA graph (dsv3.engine.cuda_graphs)
            out = self.graphs.run(items)
            if out is not None:
                return out
        input_ids, positions, ctx, rows = self.prepare(items)
        saved = self._checkpoint(items, keep=True)
        try:
            hidden, logits = self.model.step(input_ids, positions, ctx, rows)
        except BaseException:
            if saved is not None:
                self.state.rollback(*saved)
            raise
        finally:
            if self.multi_lora:  # other users of the model (LLM.score, the generator) see the base model
                set_slot_ids(self.model, None)
        return hidden, logits.float()

    @torch.inference_mode()
    def execute_greedy(self, items: list[StepItem]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A step whose sampled rows are all plain greedy: (hidden states [N, D] of every token, the greedy token of
        each requested row), the LM head screened in bf16 and recomputed in fp32 where it matters
        (`dsv3.ops.screened_greedy`: the fp32 head's argmax at a third of its cost). None, before running anything,
        when the step has no such form (few rows, drafts, adapters, per-sequence state, a CUDA graph, a head that
        is not fp32): the caller runs `execute`."""
        n_rows = sum(it.sample for it in items)
        if (n_rows <= ops.MAX_ROWS or any(it.all_logits for it in items) or self.graphs is not None
                or self.state is not None or self.multi_lora or ops.screen_head(self.model) is None):
            return None
        input_ids, positions, ctx, rows = self.prepare(items)
        hidden = self.model.hidden_states(input_ids, positions, ctx)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        picked = hidden[rows]
        tokens = ops.screened_greedy(self.model, picked)
        if tokens is None:  # an observer was added since the check: the head runs as a module
            tokens = greedy_choice(self.model.lm_head(picked).float())
        return hidden, tokens

    @torch.inference_mode()
    def execute_spec(self, items: list[StepItem], k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A greedy speculative step in one native call (`dsv3.ops.mtp_step`): each item is a sequence's last token
        and its k drafts (token_ids, k + 1 of them) at `start`, with blocks for 2k positions. Returns (tokens [B, k+1]:
        the accepted drafts and the target's next token, -1 after them; drafts [B, k] for the next step), or None
        when the model or step has no native form (the caller takes the general path)."""
        if not self.native_spec:
            return None
        width = max(len(it.block_table) for it in items)
        tables = torch.tensor([it.block_table + [0] * (width - len(it.block_table)) for it in items])
        ids = torch.tensor([it.token_ids + [it.token_ids[-1]] * (2 * k - len(it.token_ids)) for it in items])
        starts = torch.tensor([it.start for it in items])
        out = ops.mtp_step(self.model, ids, starts, tables, self.block_size, k, self.cache.native())
        return None if out is None else (out[2], out[3])

    # ---- per-sequence state (DeepSeek-V4) -------------------------------------------------------
    def begin_step(self) -> None:
        """A new engine step: forget the previous step's slot checkpoints."""
        self.checkpoints: dict[int, tuple] = {}

    def _checkpoint(self, items: list[StepItem], keep: bool = False):
        """What a step will overwrite in its slots (so one that raises is re-run exactly); with `keep`, the first
        checkpoint of each slot in this engine step is also kept, for `rewind`."""
        if self.state is None:
            return None
        whole = [len(it.token_ids) > 1 or it.start == 0 for it in items]
        saved = self.state.checkpoint([it.state_slot for it in items], whole)
        if keep:
            for entry, w in zip(saved, whole):
                self.checkpoints.setdefault(entry[0], (entry, w))
        return saved, whole

    @torch.inference_mode()
    def rewind(self, item: StepItem) -> None:
        """Speculative decoding rejected drafts that this step's forward already put into the slot: restore the slot
        as it was before the step and run only the tokens that stay (`item`), logits unused."""
        entry, whole = self.checkpoints[item.state_slot]
        if not whole:
            raise RuntimeError("a decode step's checkpoint holds the carries only; drafts are verified in chunks")
        self.state.rollback([entry], [whole])
        self.execute([item])

    @torch.inference_mode()
    def execute_mtp(self, items: list[StepItem], hidden_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run MTP module 0 on (hidden_in [N, D], the items' tokens): (its hidden states, logits of requested rows).

        The MTP module carries no adapters (PEFT's view of the model has none); it drafts on the adapted
        model's hidden states and the adapted main model verifies, so outputs stay exact.
        """
        input_ids, positions, ctx, rows = self.prepare(items, lora=False)
        saved = self._checkpoint(items)
        try:
            hidden = self.model.mtp_hidden(hidden_in[None], input_ids, positions, ctx)[0]
        except BaseException:
            if saved is not None:
                self.state.rollback(*saved)
            raise
        head = getattr(self.model, "mtp_head", self.model.lm_head)  # V4: the MTP module collapses its streams first
        return hidden, head(hidden[rows]).float()
