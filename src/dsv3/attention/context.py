"""Attention contexts: where a layer's keys come from and which queries may see which keys.

MLA computes queries and the per-token latent; a context decides what happens next. Keeping
this out of the model lets one MLA implementation serve training (no cache, document masks),
the single-request generator (a contiguous latent cache) and the batching engine (a paged
latent cache, in `dsv3.engine`), without copies of the model code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, NamedTuple

import torch

if TYPE_CHECKING:
    from dsv3.layers.mla import MLA


class NativeKeys(NamedTuple):
    """Where a step's latents go and which ones each token attends to, as the native MLA kernel reads them."""
    cache: torch.Tensor         # [slots, kv_lora_rank + rope_dim] fp32, contiguous (one layer)
    slot_mapping: torch.Tensor  # [M] int64: the slot each new token's latent is written to
    key_slots: torch.Tensor     # [M, S] int64: the slots each token attends to
    key_mask: torch.Tensor | None  # [M, S] bool (False: skip), or None


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

    def native_keys(self, layer_idx: int) -> NativeKeys | None:
        """The cache layout for the native MLA decode kernel this step, or None (no cache, or not a decode step)."""
        return None

    def native_cache(self) -> torch.Tensor | None:
        """Every layer's latent cache as one contiguous tensor [layers, ..., C + dr], for a whole-step call."""
        return None

    def native_slots(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """This step's (slot_mapping, key_slots, key_mask), the same for every layer, or None."""
        k = self.native_keys(0)
        return None if k is None else (k.slot_mapping, k.key_slots, k.key_mask)


class DenseLatentCache(AttentionContext):
    """A contiguous per-sequence cache of MLA latents ([B, max_len, kv_lora_rank + rope_dim] per layer).

    All sequences advance together (left padding aligns them), which is what a simple generator
    needs. `impl` picks the attention form: "absorb" attends over the latent directly (decode),
    "naive" re-expands keys and values (prefill), "auto" absorbs for single-token steps.
    """

    def __init__(self, num_layers: int, batch: int, max_len: int, latent_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", impl: Literal["auto", "absorb", "naive"] = "auto"):
        self.kv = torch.zeros(num_layers, batch, max_len, latent_dim, dtype=dtype, device=device)
        self.key_valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.impl = impl
        self._step = 0
        self._padded = False  # some key marked invalid (left padding): decode steps need a key mask
        self._slots = torch.arange(max_len, device=device)
        super().__init__(None)
        self._native: tuple | None | bool = None  # this step's (slot_mapping, key_slots, key_mask); False: not built yet

    # The mask and the native layout are built on first use: a native decode step needs neither the
    # [B, 1, T, S] mask nor, at batch 1 without padding, any new tensor at all.
    @property
    def mask(self) -> torch.Tensor | None:
        if self._mask is False:
            L, T = self.length, self._step
            q_slot, k_slot = self._slots[L:L + T], self._slots[:L + T]
            mask = (k_slot[None, :] <= q_slot[:, None])[None] & self.key_valid[:, None, : L + T]
            self._mask = (mask | (k_slot[None, :] == q_slot[:, None])[None])[:, None]
        return self._mask

    @mask.setter
    def mask(self, value: torch.Tensor | None) -> None:
        self._mask = value

    @property
    def max_len(self) -> int:
        return self.kv.shape[2]

    def set_padding(self, attention_mask: torch.Tensor) -> None:
        """Mark the next tokens' validity ([B, T] 0/1), e.g. left padding of a prompt batch."""
        T = attention_mask.shape[1]
        self.key_valid[:, self.length:self.length + T] = attention_mask.bool()
        self._padded = self._padded or not bool(attention_mask.bool().all())

    def begin_step(self, num_tokens: int) -> None:
        L, T = self.length, num_tokens
        if L + T > self.max_len:
            raise ValueError(f"sequence length {L + T} exceeds the cache size {self.max_len}")
        self._step = T
        self._mask = False
        self._native = False

    def end_step(self) -> None:
        self.length += self._step
        self._step = 0

    def _native_layout(self) -> tuple | None:
        L, T = self.length, self._step
        if not self._native_ok():
            return None
        B, S = self.kv.shape[1], L + T
        if self._plain_decode():  # views of one arange: no tensor built per step
            return self._slots[L:L + 1], self._slots[:S].view(1, S), None
        rows = torch.arange(B, device=self.kv.device)[:, None] * self.max_len
        q_slot, k_slot = self._slots[L:L + T], self._slots[:S]
        return (rows + q_slot).reshape(-1), (rows + k_slot).repeat_interleave(T, dim=0), self.mask.reshape(B * T, S)

    def native_keys(self, layer_idx: int) -> NativeKeys | None:
        if self._native is False:
            self._native = self._native_layout()
        if self._native is None:
            return None
        return NativeKeys(self.kv[layer_idx].view(-1, self.kv.shape[-1]), *self._native)

    def native_cache(self) -> torch.Tensor | None:
        return self.kv if self.kv.is_contiguous() else None

    def native_slots(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        if self._native is False:
            self._native = self._native_layout()
        return self._native

    def _native_ok(self) -> bool:
        return (self._step == 1 or self.impl == "absorb") and self.kv.dtype == torch.float32 and self.kv.device.type == "cpu"

    def _plain_decode(self) -> bool:
        """Batch 1, one token, no padding: the token sees every slot up to its own."""
        return self._step == 1 and self.kv.shape[1] == 1 and not self._padded

    def attend(self, layer_idx: int, mla: "MLA", q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        L, T = self.length, latent.shape[1]
        self.kv[layer_idx, :, L:L + T] = latent
        kv = self.kv[layer_idx, :, : L + T]
        absorb = self.impl == "absorb" or (self.impl == "auto" and T == 1)
        if absorb:
            return mla.attend_absorbed(q_nope, q_pe, kv, self.mask)
        return mla.attend_expanded(q_nope, q_pe, kv, self.mask)
