"""Attention contexts: where a layer's keys come from and which queries may see which keys.

An attention layer computes its queries and this step's cache entries (MLA: the latent) and hands
them to the context it was given; the context writes the entries where they belong and runs the
attention math of its backend (`dsv3.attention.backend`) over the keys it gathers. The model never
learns which one it got, so one MLA implementation serves

* `AttentionContext`: training and scoring -- whole sequences, no cache, causal or a given mask;
* `DenseLatentCache`: a contiguous cache for a batch of sequences advancing in lockstep (left
  padding aligns them): the simple decoders and the tests;
* `PagedContext`: one continuous-batching engine step over the paged cache, from metadata the
  engine builds once per step (`dsv3.attention.metadata.StepMetadata`).

Both caches are a `KVCache` laid out by the layers' `CacheSpec`s. For the native kernels, a context
also says where this step's entries go and which slots each token reads (`native_keys`).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch

from dsv3.attention.backend import TorchBackend, backend_for
from dsv3.attention.kv_cache import KVCache
from dsv3.attention.metadata import StepMetadata
from dsv3.attention.spec import CacheSpec


class IndexQuery(NamedTuple):
    """A DSA layer's indexer output for this step (`dsv3.layers.indexer`): queries q [B, T, Hi, Di], head weights
    w [B, T, Hi] (scales folded in), this step's keys [B, T, Di], and how many past tokens each query keeps."""
    q: torch.Tensor
    weights: torch.Tensor
    keys: torch.Tensor
    topk: int


class NativeKeys(NamedTuple):
    """Where a step's entries go and which ones each token attends to, as the native MLA kernel reads them."""
    cache: torch.Tensor         # [slots, width] fp32, contiguous (one layer)
    slot_mapping: torch.Tensor  # [M] int64: the slot each new token's entry is written to
    key_slots: torch.Tensor     # [M, S] int64: the slots each token attends to
    key_mask: torch.Tensor | None  # [M, S] bool (False: skip), or None


class AttentionContext:
    """No cache: full sequences, causal attention (or `mask`). Subclasses keep a cache."""

    backend: TorchBackend = backend_for("cpu")

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

    def attend(self, layer: Any, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
               index: IndexQuery | None = None) -> torch.Tensor:
        """MLA attention for queries q_* [B, T, H, *] and this step's latents [B, T, W] -> [B, T, H, dv]; with
        `index` (DSA), each query attends only to the top-k of the keys it may see."""
        if index is None:
            return self.backend.expanded(layer, q_nope, q_pe, latent, self.mask)
        T = latent.shape[1]
        valid = self.mask[:, 0] if self.mask is not None else \
            torch.ones(T, T, dtype=torch.bool, device=latent.device).tril()[None]
        sel = self.backend.sparse_mask(index.q, index.weights, index.keys, valid, index.topk)
        return self.backend.expanded(layer, q_nope, q_pe, latent, sel[:, None])

    def native_keys(self, layer_idx: int) -> NativeKeys | None:
        """The cache layout for the native MLA decode kernel this step, or None (no cache, or not a decode step)."""
        return None

    def native_cache(self) -> torch.Tensor | None:
        """Every layer's cache as one contiguous tensor [layers, slots, width], for a whole-step call."""
        return None

    def native_slots(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """This step's (slot_mapping, key_slots, key_mask), the same for every layer, or None."""
        return None


class DenseLatentCache(AttentionContext):
    """A contiguous cache for `batch` sequences of up to `max_len` positions, advancing together.

    Sequence b owns slots [b·max_len, (b+1)·max_len) of a `KVCache`; `kv` views it as
    [layers, batch, max_len, width]. Left padding (`set_padding`) marks keys no query may see.
    `impl` picks the attention form: "absorb" attends over the latent directly (decode), "naive"
    re-expands keys and values (prefill), "auto" absorbs for single-token steps.
    """

    def __init__(self, num_layers: int, batch: int, max_len: int, latent_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", impl: Literal["auto", "absorb", "naive"] = "auto",
                 spec: CacheSpec | None = None):
        spec = spec or CacheSpec("latent", (latent_dim,))
        self.cache = KVCache([spec] * num_layers, batch * max_len, dtype, device)
        self.kv = self.cache.data.view(num_layers, batch, max_len, spec.width)
        self.index_keys = None if self.cache.index is None else self.cache.index.view(num_layers, batch, max_len, -1)
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

    @classmethod
    def for_model(cls, model: Any, batch: int, max_len: int, **kw: Any) -> "DenseLatentCache":
        """A contiguous cache laid out by the model's cache specs (main layers and MTP modules)."""
        specs = model.cache_specs()
        return cls(len(specs), batch, max_len, specs[0].width, model.dtype, model.device, spec=specs[0], **kw)

    def attend(self, layer: Any, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
               index: IndexQuery | None = None) -> torch.Tensor:
        L, T = self.length, latent.shape[1]
        i = layer.layer_idx
        self.kv[i, :, L:L + T] = latent
        kv = self.kv[i, :, : L + T]
        mask = self.mask
        if index is not None:
            self.index_keys[i, :, L:L + T] = index.keys
            sel = self.backend.sparse_mask(index.q, index.weights, self.index_keys[i, :, : L + T], mask[:, 0], index.topk)
            mask = sel[:, None]
        if self.impl == "absorb" or (self.impl == "auto" and T == 1):
            return self.backend.absorbed(layer, q_nope, q_pe, kv, mask)
        return self.backend.expanded(layer, q_nope, q_pe, kv, mask)

    def _native_layout(self) -> tuple | None:
        L, T = self.length, self._step
        if not ((T == 1 or self.impl == "absorb") and self.cache.native() is not None):
            return None
        B, S = self.kv.shape[1], L + T
        if T == 1 and B == 1 and not self._padded:  # the token sees every slot up to its own: views of one arange
            return self._slots[L:L + 1], self._slots[:S].view(1, S), None
        rows = torch.arange(B, device=self.kv.device)[:, None] * self.max_len
        q_slot, k_slot = self._slots[L:L + T], self._slots[:S]
        return (rows + q_slot).reshape(-1), (rows + k_slot).repeat_interleave(T, dim=0), self.mask.reshape(B * T, S)

    def native_slots(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        if self._native is False:
            self._native = self._native_layout()
        return self._native

    def native_keys(self, layer_idx: int) -> NativeKeys | None:
        slots = self.native_slots()
        return None if slots is None else NativeKeys(self.cache.data[layer_idx], *slots)

    def native_cache(self) -> torch.Tensor | None:
        return self.cache.native()


class PagedContext(AttentionContext):
    """One engine step over the paged cache (tokens flattened as batch 1): decode tokens attend in the absorbed
    form over their gathered slots, each prefill chunk in the expanded form over its cached prefix plus itself."""

    def __init__(self, cache: KVCache, meta: StepMetadata):
        super().__init__(None)
        self.cache, self.meta = cache, meta
        self._native = meta.native_layout() if cache.native() is not None else None

    def attend(self, layer: Any, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
               index: IndexQuery | None = None) -> torch.Tensor:
        m, i, be = self.meta, layer.layer_idx, self.backend
        self.cache.write(i, m.slot_mapping, latent[0])
        if index is not None:
            self.cache.write_index(i, m.slot_mapping, index.keys[0])
        out = q_nope.new_empty(q_nope.shape[1], layer.n_heads, layer.v_dim)
        if m.decode_tokens.numel():
            d = m.decode_tokens
            slots, mask = m.decode_slots, m.decode_mask  # [Bd, S], [Bd, 1, 1, S]
            if index is not None and slots.shape[1] > index.topk:
                # DSA decode: score every past token by its index key, then read only the chosen tokens' entries
                iq, iw, keys = index.q[0, d, None], index.weights[0, d, None], self.cache.read_index(i, slots)
                if m.decode_lens is not None:  # each row sees a prefix of its slots: one fused pass
                    idx, ok = be.index_topk(iq, iw, keys, m.decode_lens[:, None], index.topk)  # [Bd, 1, k]
                else:
                    idx, ok = be.topk_select(be.index_scores(iq, iw, keys), mask[:, 0], index.topk)
                slots, mask = slots.gather(1, idx[:, 0]), ok[:, None]
            cache = self.cache.native()
            if (index is None and cache is not None and d.numel() > 1 and be.reads_slots(cache)
                    and layer._kv_b_lora(m.decode_adapters, d.numel()) is None):
                # batched decode: attention reads the cache in place (dsv3::mla_attend), no gathered copy
                lens = m.decode_lens
                if lens is None:  # metadata built elsewhere (CUDA graphs' static buffer): the mask says which count
                    slots = slots.masked_fill(~mask.reshape(slots.shape), -1)
                out[d] = be.decode_slots(layer, q_nope[0, d, None], q_pe[0, d, None], cache[i], slots, lens)[:, 0]
            else:
                kv = self.cache.read(i, slots)  # [Bd, S or k, W]
                out[d] = be.absorbed(layer, q_nope[0, d, None], q_pe[0, d, None], kv, mask, m.decode_adapters)[:, 0]
        for p in m.prefills:
            kv = self.cache.read(i, p.context_slots)[None]
            n = p.token_slice.stop - p.token_slice.start
            mask = None
            if p.start or index is not None:
                mask = torch.ones(n, p.start + n, dtype=torch.bool, device=kv.device).tril(p.start)[None, None]
            if index is not None:
                ts = p.token_slice
                mask = be.sparse_mask(index.q[:, ts], index.weights[:, ts], self.cache.read_index(i, p.context_slots)[None],
                                      mask[:, 0], index.topk)[:, None]
            out[p.token_slice] = be.expanded(layer, q_nope[:, p.token_slice], q_pe[:, p.token_slice], kv, mask,
                                             p.adapter)[0]
        return out[None]

    def native_keys(self, layer_idx: int) -> NativeKeys | None:
        if self._native is None:
            return None
        return NativeKeys(self.cache.data[layer_idx], self.meta.slot_mapping, *self._native)

    def native_cache(self) -> torch.Tensor | None:
        return self.cache.native()

    def native_slots(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        return None if self._native is None else (self.meta.slot_mapping, *self._native)


class SequenceStates(AttentionContext):
    """One engine step over a model that keeps per-sequence state (DeepSeek-V4): the flat batch's sequences in
    order, each with its state slot, first position, token count and block table, and the model's own cache
    object (`model.paged_state(...)`), which the model alone reads and writes."""

    def __init__(self, state: Any, slots: list[int], starts: list[int], num_tokens: list[int],
                 block_tables: list[list[int]]):
        super().__init__(None)
        self.state, self.slots, self.starts, self.num_tokens = state, slots, starts, num_tokens
        self.block_tables = block_tables
