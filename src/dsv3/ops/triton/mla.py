"""Absorbed MLA decode over the paged latent cache, dense or sparse (DSA): FlashMLA's job, in Triton.

Each query row m (a decode token) has H absorbed queries q [H, C + dr] — (q_nope·W_UK | rope(q_pe)) —
and reads the latent entries [C + dr] of the cache slots listed in `key_slots[m]`: the cache is one
layer of `dsv3.attention.kv_cache.KVCache` ([slots, C + dr]), the slots are `StepMetadata`'s decode
slots (dense: every past token, with `key_lens[m]` of them real) or a DeepSeek-V3.2 indexer's top-k
choice (sparse: int32 [rows, k], -1 = padding). Output: o_lat [M, H, C] = softmax(q·kᵀ·scale)·c over
the latents (W_UV is applied by the caller), fp32 softmax and accumulation.

Flash-decoding: the keys of a row are split into `num_splits` ranges that run in parallel, each
keeps an online softmax over blocks of keys; a second kernel merges the splits by their log-sum-exp.
Everything the kernels read about lengths is on the device, so a captured CUDA graph replays for
any context length up to the width it was captured with.
"""

from __future__ import annotations

import math

import torch
import triton.language as tl

from dsv3.ops.triton._launch import check_device, fix_interpreter, jit, next_pow2

LOG2E = 1.4426950408889634


@jit
def _mla_split_kernel(Q, Cache, Slots, Lens, Out, Lse, scale_log2, H, C, DR, S, keys_per_split,
                      stride_qm, stride_qh, stride_cs, stride_sm, stride_om, stride_oh, stride_os, stride_lm, stride_lh,
                      HAS_LENS: tl.constexpr, IEEE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    m = tl.program_id(0)
    hb = tl.program_id(1)
    sp = tl.program_id(2)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    offc = tl.arange(0, BLOCK_C)
    cmask = offc < C
    offr = tl.arange(0, BLOCK_R)
    rmask = offr < DR
    qrow = Q + m.to(tl.int64) * stride_qm + heads[:, None] * stride_qh
    q = tl.load(qrow + offc[None, :], mask=hmask[:, None] & cmask[None, :], other=0.0)
    qr = tl.load(qrow + C + offr[None, :], mask=hmask[:, None] & rmask[None, :], other=0.0)
    n = S
    if HAS_LENS:
        n = tl.minimum(tl.load(Lens + m).to(tl.int32), S)
    start = sp * keys_per_split
    end = tl.minimum(start + keys_per_split, n)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    for j0 in range(start, end, BLOCK_N):
        offs = j0 + tl.arange(0, BLOCK_N)
        jm = offs < end
        slot = tl.load(Slots + m.to(tl.int64) * stride_sm + offs, mask=jm, other=-1).to(tl.int64)
        valid = jm & (slot >= 0)
        slot = tl.where(valid, slot, 0)
        krow = Cache + slot[:, None] * stride_cs
        kv = tl.load(krow + offc[None, :], mask=valid[:, None] & cmask[None, :], other=0.0)
        kr = tl.load(krow + C + offr[None, :], mask=valid[:, None] & rmask[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(kv), input_precision="ieee") + tl.dot(qr, tl.trans(kr), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kv)) + tl.dot(qr, tl.trans(kr))
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    orow = Out + m.to(tl.int64) * stride_om + heads[:, None] * stride_oh + sp * stride_os
    tl.store(orow + offc[None, :], out, mask=hmask[:, None] & cmask[None, :])
    tl.store(Lse + m.to(tl.int64) * stride_lm + heads * stride_lh + sp, lse, mask=hmask)


@jit
def _mla_combine_kernel(Part, Lse, Out, C, SPLITS, stride_pm, stride_ph, stride_ps, stride_lm, stride_lh,
                        stride_om, stride_oh, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    m = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.arange(0, BLOCK_S)
    smask = offs < SPLITS
    lse = tl.load(Lse + m.to(tl.int64) * stride_lm + h * stride_lh + offs, mask=smask, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(lse - top)
    total = tl.sum(w, 0)
    w = w / tl.where(total > 0, total, 1.0)
    offc = tl.arange(0, BLOCK_C)
    cmask = offc < C
    part = tl.load(Part + m.to(tl.int64) * stride_pm + h * stride_ph + offs[:, None] * stride_ps + offc[None, :],
                   mask=smask[:, None] & cmask[None, :], other=0.0)
    out = tl.sum(part * w[:, None], 0)
    tl.store(Out + m.to(tl.int64) * stride_om + h * stride_oh + offc, out.to(Out.dtype.element_ty), mask=cmask)


def default_splits(rows: int, heads: int, width: int, block_h: int = 16, block_n: int = 32) -> int:
    """Key ranges per row: enough programs to fill a GPU (~2 per SM of an H100) without splits shorter than a block."""
    programs = rows * math.ceil(heads / block_h)
    return max(1, min(math.ceil(264 / programs), math.ceil(width / block_n), 64))


def mla_decode(q: torch.Tensor, cache: torch.Tensor, key_slots: torch.Tensor, key_lens: torch.Tensor | None,
               kv_lora_rank: int, scale: float, num_splits: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """o_lat [M, H, C] for absorbed queries q [M, H, C + dr] over `cache` [slots, C + dr] at `key_slots` [M, S]
    (int32/int64, -1 = no key); with `key_lens` [M], only the first key_lens[m] slots of row m are read."""
    check_device(q, "mla_decode")
    fix_interpreter()
    M, H, W = q.shape
    C = kv_lora_rank
    if cache.shape[-1] != W or key_slots.shape[0] != M or cache.dim() != 2:
        raise ValueError(f"mla_decode: q {list(q.shape)}, cache {list(cache.shape)}, key_slots {list(key_slots.shape)} disagree")
    S = key_slots.shape[1]
    key_slots = key_slots if key_slots.stride(-1) == 1 else key_slots.contiguous()
    q = q if q.stride(-1) == 1 else q.contiguous()
    if cache.stride(-1) != 1:
        raise ValueError("mla_decode: the cache's last dimension must be contiguous")
    block_h = min(64, max(16, next_pow2(H)))
    block_n = block_n or (16 if q.device.type == "cpu" else 32)
    splits = num_splits or default_splits(M, H, S, block_h, block_n)
    per_split = max(1, math.ceil(S / splits))
    part = torch.empty(M, H, splits, C, dtype=torch.float32, device=q.device)
    lse = torch.empty(M, H, splits, dtype=torch.float32, device=q.device)
    out = torch.empty(M, H, C, dtype=q.dtype, device=q.device)
    if M == 0:
        return out
    lens = key_lens if key_lens is not None else key_slots  # any tensor: not read without HAS_LENS
    grid = (M, math.ceil(H / block_h), splits)
    _mla_split_kernel[grid](q, cache, key_slots, lens, part, lse, scale * LOG2E, H, C, W - C, S, per_split,
                            q.stride(0), q.stride(1), cache.stride(0), key_slots.stride(0), part.stride(0),
                            part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
                            HAS_LENS=key_lens is not None, IEEE=cache.dtype == torch.float32, BLOCK_H=block_h,
                            BLOCK_C=max(16, next_pow2(C)), BLOCK_R=max(16, next_pow2(W - C)), BLOCK_N=block_n)
    _mla_combine_kernel[(M, H)](part, lse, out, C, splits, part.stride(0), part.stride(1), part.stride(2),
                                lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
                                BLOCK_S=max(2, next_pow2(splits)), BLOCK_C=max(16, next_pow2(C)))
    return out


def mla_decode_sparse(q: torch.Tensor, cache: torch.Tensor, indices: torch.Tensor, kv_lora_rank: int,
                      scale: float, num_splits: int | None = None) -> torch.Tensor:
    """DeepSeek Sparse Attention decode: each row attends only to its top-k cache slots `indices` [M, k]
    (int32, -1 = padding), as a V3.2 indexer chose them."""
    return mla_decode(q, cache, indices, None, kv_lora_rank, scale, num_splits)


def slots_from_block_table(block_table: torch.Tensor, block_size: int, width: int) -> torch.Tensor:
    """[B, blocks] block table -> [B, width] slots (position p -> table[p // bs] · bs + p % bs), on the device."""
    pos = torch.arange(width, device=block_table.device)
    return block_table.long()[:, pos // block_size] * block_size + pos % block_size
