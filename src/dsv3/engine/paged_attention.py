"""Attention over the paged MLA latent cache for one engine step.

A step is a flat batch of tokens from many sequences (decodes and prefill chunks mixed). Every
token's latent (`kv_lora_rank + qk_rope_head_dim` values) is written to its slot; decode tokens
are then attended together in the absorbed form over their gathered latents, and each prefill
chunk attends in the expanded form over its cached prefix plus itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dsv3.attention.context import AttentionContext, NativeKeys
from dsv3.layers.mla import MLA


class LatentCache:
    """Per-layer block storage: [layers, blocks·block_size, latent_dim], fp or int8 with per-token scales."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, latent_dim: int, kv_lora_rank: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", quantized: bool = False):
        self.block_size, self.kv_lora_rank, self.quantized = block_size, kv_lora_rank, quantized
        self.dtype = dtype
        slots = num_blocks * block_size
        self.data = torch.zeros(num_layers, slots, latent_dim, dtype=torch.int8 if quantized else dtype, device=device)
        # int8: one scale for the latent part and one for the rotary key of each token
        self.scales = torch.ones(num_layers, slots, 2, dtype=torch.float32, device=device) if quantized else None

    def bytes_per_token(self) -> int:
        per_layer = self.data.shape[-1] * self.data.element_size() + (8 if self.quantized else 0)
        return per_layer * self.data.shape[0]

    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor) -> None:
        if not self.quantized:
            self.data[layer, slots] = latent.to(self.dtype)
            return
        parts = latent.float().split([self.kv_lora_rank, latent.shape[-1] - self.kv_lora_rank], dim=-1)
        scales = torch.stack([p.abs().amax(-1).clamp(min=1e-8) / 127.0 for p in parts], dim=-1)
        q = torch.cat([(p / scales[:, i:i + 1]).round().clamp(-127, 127) for i, p in enumerate(parts)], dim=-1)
        self.data[layer, slots] = q.to(torch.int8)
        self.scales[layer, slots] = scales

    def read(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return self.data[layer, slots]
        q, s = self.data[layer, slots].float(), self.scales[layer, slots]
        r = self.kv_lora_rank
        return torch.cat([q[..., :r] * s[..., :1], q[..., r:] * s[..., 1:]], dim=-1).to(self.dtype)


@dataclass
class PrefillChunk:
    token_slice: slice  # this chunk's tokens within the flat step batch
    context_slots: torch.Tensor  # slots of positions [0, start + n)
    start: int
    adapter: Any = None  # the sequence's LoRA slot (a SlotBatch) when the model serves several adapters


class PagedContext(AttentionContext):
    """The attention context the engine passes to the model for one step (tokens flattened as batch 1)."""

    def __init__(self, cache: LatentCache, slot_mapping: torch.Tensor, decode_tokens: torch.Tensor,
                 decode_slots: torch.Tensor, decode_mask: torch.Tensor, prefills: list[PrefillChunk],
                 decode_adapters: Any = None):
        super().__init__(None)
        self.cache, self.slot_mapping = cache, slot_mapping
        self.decode_tokens, self.decode_slots, self.decode_mask = decode_tokens, decode_slots, decode_mask
        self.prefills = prefills
        self.decode_adapters = decode_adapters  # LoRA slot per decode row (a SlotBatch), or None
        self._native = self._native_layout()

    def _native_layout(self) -> tuple | None:
        """(key_slots [N, S], key_mask [N, S]) per token of the step for the native MLA kernel, or None.

        Steps of at most `MAX_ROWS` tokens qualify: decodes, and the short chunks of speculative
        verification and MTP drafting (token t of a chunk starting at `start` sees slots
        [0, start + t]). Not with LoRA adapters or the int8 latent cache, or off CPU / fp32.
        """
        from dsv3 import ops

        n = self.slot_mapping.numel()
        if (n == 0 or n > ops.MAX_ROWS or self.decode_adapters is not None or self.cache.quantized
                or self.cache.dtype != torch.float32 or not self.cache.data.is_cpu or any(p.adapter is not None for p in self.prefills)):
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

    def native_keys(self, layer_idx: int) -> NativeKeys | None:
        if self._native is None:
            return None
        return NativeKeys(self.cache.data[layer_idx], self.slot_mapping, *self._native)

    def native_cache(self) -> torch.Tensor | None:
        return self.cache.data if not self.cache.quantized else None

    def native_slots(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        return None if self._native is None else (self.slot_mapping, *self._native)

    def attend(self, layer_idx: int, mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        self.cache.write(layer_idx, self.slot_mapping, latent[0])
        out = q_nope.new_empty(q_nope.shape[1], mla.n_heads, mla.v_dim)
        if self.decode_tokens.numel():
            d = self.decode_tokens
            kv = self.cache.read(layer_idx, self.decode_slots)  # [Bd, S, W]
            out[d] = mla.attend_absorbed(q_nope[0, d, None], q_pe[0, d, None], kv, self.decode_mask,
                                         self.decode_adapters)[:, 0]
        for p in self.prefills:
            kv = self.cache.read(layer_idx, p.context_slots)[None]
            n = p.token_slice.stop - p.token_slice.start
            mask = None
            if p.start:
                mask = torch.ones(n, p.start + n, dtype=torch.bool, device=kv.device).tril(p.start)[None, None]
            out[p.token_slice] = mla.attend_expanded(q_nope[:, p.token_slice], q_pe[:, p.token_slice], kv, mask, p.adapter)[0]
        return out[None]
