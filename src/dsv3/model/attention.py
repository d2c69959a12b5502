"""Attention contexts: where a layer's keys come from and which queries may see which keys.

MLA computes queries and the per-token latent; a context decides what happens next. Keeping
this out of the model lets one MLA implementation serve training (no cache, document masks),
the single-request generator (a contiguous latent cache) and the batching engine (a paged
latent cache, in `dsv3.engine`), without copies of the model code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from dsv3.kernels.mla import NativeKeys
    from dsv3.model.mla import MLA


class AttentionContext:
    """Base: full sequences, causal attention, no cache. Subclasses override `attend`."""

    def __init__(self, mask: torch.Tensor | None = None):
        self.mask = mask  # bool [B, 1, T, S], True = may attend; None = plain causal

    @classmethod
    def causal(cls, attention_mask: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None) -> "AttentionContext":
        """Causal mask, optionally restricted to valid keys ([B, T] 0/1) and to the query's document."""
        if attention_mask is None and doc_ids is None:
            return cls(None)
        ref = attention_mask if attention_mask is not None else doc_ids
        T = ref.shape[-1]
        mask = torch.ones(T, T, dtype=torch.bool, device=ref.device).tril()[None, None]
        if doc_ids is not None:
            mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
        # A padded query would see no key at all (NaN softmax): let every token see itself.
        return cls(mask | torch.eye(T, dtype=torch.bool, device=ref.device)[None, None])

    def begin_step(self, num_tokens: int) -> None:
        """Called by the model before its layers run on `num_tokens` new positions."""

    def end_step(self) -> None:
        """Called by the model after all layers ran."""

    def attend(self, layer_idx: int, mla: "MLA", q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        return mla.attend_expanded(q_nope, q_pe, latent, self.mask)

    def native_keys(self, layer_idx: int) -> "NativeKeys | None":
        """The cache layout for the native MLA decode kernel this step, or None (no cache, or not a decode step)."""
        return None


class DenseLatentCache(AttentionContext):
    """A contiguous per-sequence cache of MLA latents ([B, max_len, kv_lora_rank + rope_dim] per layer).

    All sequences advance together (left padding aligns them), which is what a simple generator
    needs. `impl` picks the attention form: "absorb" attends over the latent directly (decode),
    "naive" re-expands keys and values (prefill), "auto" absorbs for single-token steps.
    """

    def __init__(self, num_layers: int, batch: int, max_len: int, latent_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", impl: Literal["auto", "absorb", "naive"] = "auto"):
        super().__init__(None)
        self.kv = torch.zeros(num_layers, batch, max_len, latent_dim, dtype=dtype, device=device)
        self.key_valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.impl = impl
        self._step = 0
        self._native: tuple | None = None  # (slot_mapping, key_slots, key_mask) of this step, for the native kernel

    @property
    def max_len(self) -> int:
        return self.kv.shape[2]

    def set_padding(self, attention_mask: torch.Tensor) -> None:
        """Mark the next tokens' validity ([B, T] 0/1), e.g. left padding of a prompt batch."""
        T = attention_mask.shape[1]
        self.key_valid[:, self.length:self.length + T] = attention_mask.bool()

    def begin_step(self, num_tokens: int) -> None:
        L, T = self.length, num_tokens
        if L + T > self.max_len:
            raise ValueError(f"sequence length {L + T} exceeds the cache size {self.max_len}")
        q_slot = torch.arange(L, L + T, device=self.kv.device)
        k_slot = torch.arange(L + T, device=self.kv.device)
        mask = (k_slot[None, :] <= q_slot[:, None])[None] & self.key_valid[:, None, : L + T]
        self.mask = (mask | (k_slot[None, :] == q_slot[:, None])[None])[:, None]
        self._step = T
        self._native = None
        if (T == 1 or self.impl == "absorb") and self.kv.dtype == torch.float32 and self.kv.device.type == "cpu":
            B, S = self.kv.shape[1], L + T
            rows = torch.arange(B, device=self.kv.device)[:, None] * self.max_len
            self._native = (rows + q_slot).reshape(-1), (rows + k_slot).repeat_interleave(T, dim=0), self.mask.reshape(B * T, S)

    def end_step(self) -> None:
        self.length += self._step
        self._step = 0

    def native_keys(self, layer_idx: int) -> "NativeKeys | None":
        if self._native is None:
            return None
        from dsv3.kernels.mla import NativeKeys
        return NativeKeys(self.kv[layer_idx].view(-1, self.kv.shape[-1]), *self._native)

    def attend(self, layer_idx: int, mla: "MLA", q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        L, T = self.length, latent.shape[1]
        self.kv[layer_idx, :, L:L + T] = latent
        kv = self.kv[layer_idx, :, : L + T]
        absorb = self.impl == "absorb" or (self.impl == "auto" and T == 1)
        if absorb:
            return mla.attend_absorbed(q_nope, q_pe, kv, self.mask)
        return mla.attend_expanded(q_nope, q_pe, kv, self.mask)
