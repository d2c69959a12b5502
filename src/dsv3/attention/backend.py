"""Attention backends: where the attention math of a layer runs, given the keys its context gathered.

MLA has two mathematically equal forms (see `dsv3.layers.mla`): `expanded` re-projects cached
latents to per-head keys and values and runs scaled-dot-product attention (prefill, training);
`absorbed` folds W_UK into the query and W_UV into the output and attends over the latents
themselves (decode). `TorchBackend` computes both with PyTorch ops on any device; a GPU backend
(Triton, FlashMLA) is another class with the same two methods, picked by `backend_for`. The native
CPU kernels run a whole decode layer (projections included) and are reached through `dsv3.ops`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

from dsv3 import ops


class MLA(Protocol):
    """What the MLA math reads from its layer (`dsv3.layers.mla.MLA`): shapes, the softmax scale, kv_b."""

    layer_idx: int
    n_heads: int
    nope_dim: int
    rope_dim: int
    v_dim: int
    kv_lora_rank: int
    scale: float
    kv_b_proj: Any

    def kv_b_weight(self, with_lora: bool = True) -> torch.Tensor: ...

    def _kv_b_lora(self, slots: Any, rows: int) -> list | None: ...


class TorchBackend:
    """MLA attention with PyTorch ops (SDPA for the expanded form, batched matmuls for the absorbed one)."""

    name = "torch"

    def expanded(self, layer: "MLA", q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor,
                 mask: torch.Tensor | None, slots=None) -> torch.Tensor:
        """Standard attention after expanding the latent. q_* [B,T,H,*], kv [B,S,Rkv+dr] -> [B,T,H,dv].

        `slots` (adapter slot per kv row [B], a multi-LoRA engine's) picks kv_b_proj's adapter for the keys.
        """
        B, S, _ = kv.shape
        c, k_pe = kv.split([layer.kv_lora_rank, layer.rope_dim], dim=-1)
        kv_b = layer.kv_b_proj(c) if slots is None or not hasattr(layer.kv_b_proj, "lora_terms") else layer.kv_b_proj(c, slots)
        k_nope, v = kv_b.view(B, S, layer.n_heads, -1).split([layer.nope_dim, layer.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, layer.n_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        causal = mask is None and q.shape[1] > 1
        pad = q.shape[-1] - layer.v_dim  # fused (flash) SDPA kernels want one head size: zero-pad V, slice after
        v = F.pad(v, (0, pad)) if pad > 0 else v
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, is_causal=causal, scale=layer.scale)
        return o.transpose(1, 2)[..., : layer.v_dim]

    def absorbed(self, layer: "MLA", q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor,
                 mask: torch.Tensor | None, slots=None) -> torch.Tensor:
        """Attention over the latent: scores = (q_nope W_UK)·c + q_pe·k_pe, output = W_UV (p·c).

        With `slots` (adapter slot per batch row), kv_b_proj's LoRA deltas s·B·A are applied in the
        absorbed form per adapter, q_lat += s·(q_nope·B_UK)·A and out += s·(o_lat·Aᵀ)·B_UVᵀ, so a batch
        mixing adapters never needs a kv_b weight per sequence.
        """
        terms = layer._kv_b_lora(slots, q_nope.shape[0])
        w = layer.kv_b_weight(with_lora=terms is None)
        w_uk, w_uv = w[:, : layer.nope_dim], w[:, layer.nope_dim:]  # [H, dn, C], [H, dv, C]
        B, T, H, _ = q_nope.shape
        S, C = kv.shape[1], layer.kv_lora_rank
        # Batched matmuls with heads as the batch (einsum's planning costs more than the math at decode).
        q_lat = torch.bmm(q_nope.permute(2, 0, 1, 3).reshape(H, B * T, -1), w_uk).view(H, B, T, C).transpose(0, 1)
        for rows, a, b, s in terms or ():
            b_uk = b.to(q_nope.dtype).view(layer.n_heads, -1, b.shape[-1])[:, : layer.nope_dim]
            q_lat[rows] += s * torch.einsum("bhtr,rc->bhtc", torch.einsum("bthd,hdr->bhtr", q_nope[rows], b_uk), a.to(q_nope.dtype))
        # One product for both score terms: [q_lat | q_pe] · [c | k_pe], the latent as stored.
        q_full = torch.cat([q_lat, q_pe.transpose(1, 2).to(q_lat.dtype)], dim=-1).reshape(B, H * T, -1)
        scores = torch.bmm(q_full, kv.transpose(1, 2)).view(B, H, T, S).float() * layer.scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        elif T > 1:
            scores = scores.masked_fill(torch.ones(T, S, dtype=torch.bool, device=kv.device).tril(S - T).logical_not(), float("-inf"))
        p = scores.softmax(dim=-1).to(kv.dtype)
        o_lat = torch.bmm(p.view(B, H * T, S), kv[..., :C]).view(B, H, T, C)
        out = torch.bmm(o_lat.transpose(0, 1).reshape(H, B * T, C), w_uv.transpose(1, 2)).view(H, B, T, -1).permute(1, 2, 0, 3)
        for rows, a, b, s in terms or ():
            b_uv = b.to(o_lat.dtype).view(layer.n_heads, -1, b.shape[-1])[:, layer.nope_dim:]
            out[rows] += s * torch.einsum("bhtr,hdr->bthd", torch.einsum("bhtc,rc->bhtr", o_lat[rows], a.to(o_lat.dtype)), b_uv)
        return out

    def reads_slots(self, cache: torch.Tensor) -> bool:
        """Whether `decode_slots` runs a kernel that reads this cache in place (the native CPU `dsv3::mla_attend`);
        otherwise decode attention gathers the keys and runs `absorbed`."""
        return cache.is_cpu and cache.dtype == torch.float32 and ops.backend(cache.device) == "native-cpu"

    def decode_slots(self, layer: "MLA", q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                     key_slots: torch.Tensor, key_lens: torch.Tensor | None) -> torch.Tensor:
        """Absorbed decode straight from a cache layer [slots, C + dr] (no gathered copy): q_* [B, 1, H, *],
        key_slots [B, S] (-1: none; the first key_lens[b] count when given) -> [B, 1, H, dv]."""
        w = layer.kv_b_weight()
        w_uk, w_uv = w[:, : layer.nope_dim], w[:, layer.nope_dim:]  # [H, dn, C], [H, dv, C]
        q_lat = torch.bmm(q_nope[:, 0].transpose(0, 1).to(w.dtype), w_uk).transpose(0, 1)  # [B, H, C]
        q = torch.cat([q_lat, q_pe[:, 0].to(q_lat.dtype)], dim=-1).to(cache.dtype).contiguous()
        o_lat = torch.ops.dsv3.mla_attend(q, cache, key_slots, key_lens, layer.kv_lora_rank, layer.scale)
        out = torch.bmm(o_lat.transpose(0, 1).to(w.dtype), w_uv.transpose(1, 2))  # [H, B, dv]
        return out.transpose(0, 1)[:, None]

    # ---- DeepSeek Sparse Attention (V3.2): the indexer's scores and the top-k choice ----------------------
    def index_scores(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Σ_h w[b,t,h] · relu(q[b,t,h] · keys[b,s]) for q [B, T, Hi, Di], w [B, T, Hi], keys [B, S, Di] -> [B, T, S]
        fp32, computed a few queries at a time so prefill never holds [T, Hi, S] at once."""
        B, T, Hi, Di = q.shape
        S = keys.shape[1]
        kt = keys.float().transpose(1, 2)  # [B, Di, S]
        out = torch.empty(B, T, S, dtype=torch.float32, device=q.device)
        step = max(1, (1 << 24) // max(1, Hi * S))
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            dots = torch.bmm(q[:, t0:t1].float().reshape(B, (t1 - t0) * Hi, Di), kt).relu_()  # [B, t·Hi, S]
            out[:, t0:t1] = torch.matmul(w[:, t0:t1, None].float(), dots.view(B, t1 - t0, Hi, S)).squeeze(2)
        return out

    def topk_select(self, scores: torch.Tensor, valid: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k keys per query among the valid ones: (indices [..., k'], selected-and-valid [..., k']),
        k' = min(k, S). Ties at the k-th score go to the earliest positions, so a query chooses the same keys
        whether it is scored in a full forward or in a decode step (`torch.topk` alone breaks ties by layout)."""
        S = scores.shape[-1]
        scores = scores.masked_fill(~valid, float("-inf"))
        if S <= k:
            idx = torch.arange(S, device=scores.device).expand(scores.shape)
            return idx, valid.expand(scores.shape)
        vals, idx = scores.topk(k, dim=-1)
        kth = vals[..., -1:]
        tied = (scores == kth).sum(-1) > (vals == kth).sum(-1)
        tied &= torch.isfinite(kth[..., 0])
        if tied.any():  # re-choose those rows with a stable sort: equal scores keep position order
            rows = scores[tied]
            idx[tied] = rows.sort(dim=-1, descending=True, stable=True).indices[..., :k]
        return idx, torch.isfinite(scores.gather(-1, idx))  # scores are finite: -inf marks the invalid keys

    def index_topk(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, n_visible: torch.Tensor,
                   k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`topk_select(index_scores(q, w, keys), s < n_visible[b, t], k)` without the [B, T, S] scores where the
        native CPU kernel is loaded (`dsv3::index_topk`, csrc/index.c); the two steps above elsewhere."""
        out = ops.index_topk(q, w, keys, n_visible, k)
        if out is not None:
            return out
        valid = torch.arange(keys.shape[1], device=keys.device) < n_visible[..., None]
        return self.topk_select(self.index_scores(q, w, keys), valid, k)

    def sparse_mask(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor,
                    k: int) -> torch.Tensor:
        """DSA as a mask: bool [B, T, S], True where key s is among query t's top-k valid keys (`valid` [B, T, S])."""
        scores = self.index_scores(q, w, keys)
        valid = valid.expand(scores.shape)
        if scores.shape[-1] <= k:
            return valid
        idx, ok = self.topk_select(scores, valid, k)
        return torch.zeros_like(valid).scatter_(-1, idx, ok)


class TritonBackend(TorchBackend):
    """MLA on CUDA: single-token absorbed attention runs `dsv3::mla_attend` (Triton flash-decoding, see
    `dsv3.ops.triton`); the expanded form, multi-token chunks, per-slot LoRA and DSA scoring run as in
    TorchBackend. Without Triton it is TorchBackend."""

    name = "triton"

    def reads_slots(self, cache: torch.Tensor) -> bool:
        return cache.is_cuda and _gpu_ops()

    def absorbed(self, layer: "MLA", q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor,
                 mask: torch.Tensor | None, slots=None) -> torch.Tensor:
        B, T, H, _ = q_nope.shape
        if not (kv.is_cuda and T == 1 and layer._kv_b_lora(slots, B) is None and _gpu_ops()):
            return super().absorbed(layer, q_nope, q_pe, kv, mask, slots)
        return self.decode_slots(layer, q_nope, q_pe, kv.reshape(B * kv.shape[1], -1), gathered_slots(kv, mask), None)

def gathered_slots(kv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Gathered keys kv [B, S, W] as slots of kv.view(B·S, W): [B, S], -1 where `mask` ([B or 1, 1, 1, S]) is False."""
    B, S = kv.shape[:2]
    slots = torch.arange(B * S, device=kv.device).view(B, S)
    return slots if mask is None else slots.masked_fill(~mask.expand(B, 1, 1, S).reshape(B, S), -1)


def _gpu_ops() -> bool:
    from dsv3.ops import triton as gpu

    return gpu.register()


_BACKENDS = {"torch": TorchBackend(), "triton": TritonBackend()}


def backend_for(device: torch.device | str) -> TorchBackend:
    """The attention backend for a device: Triton kernels on CUDA, PyTorch elsewhere."""
    return _BACKENDS["triton" if torch.device(device).type == "cuda" else "torch"]
