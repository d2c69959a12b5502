"""Python side of `mla.c`: one native call for an MLA layer's decode step.

Projections go as `dsv3.kernels.layers` descriptors (fp32, int8 or int4); a layer with any other
projection (LoRA, FP8, bf16) keeps the PyTorch path.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch
from torch import nn

from dsv3 import kernels
from dsv3.kernels.layers import Lin, cached_plan, describe


class MLADims(ctypes.Structure):
    _fields_ = [(k, ctypes.c_long) for k in ("D", "H", "dn", "dr", "dv", "C", "Rq")] + \
               [(k, ctypes.c_float) for k in ("q_eps", "kv_eps", "scale")]


class NativeKeys(NamedTuple):
    """Where a step's latents go and which ones each token attends to, as the kernel reads them."""
    cache: torch.Tensor         # [slots, kv_lora_rank + rope_dim] fp32, contiguous (one layer)
    slot_mapping: torch.Tensor  # [M] int64: the slot each new token's latent is written to
    key_slots: torch.Tensor     # [M, S] int64: the slots each token attends to
    key_mask: torch.Tensor | None  # [M, S] bool (False: skip), or None


_PROJS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def plan(mla: nn.Module) -> tuple | None:
    """(dims, descriptors, norms, W_kvb, tensors kept alive) for `mla`; None when a projection has no native form."""
    return cached_plan(mla, _PROJS, lambda: _build(mla))


def _build(mla: nn.Module) -> tuple | None:
    keep: list[torch.Tensor] = []
    lowrank = mla.q_lora_rank is not None
    projs = [mla.q_a_proj, mla.q_b_proj] if lowrank else [mla.q_proj]
    descs = [describe(m, keep) for m in projs + [mla.kv_a_proj_with_mqa, mla.o_proj]]
    norms = ([mla.q_a_layernorm.weight] if lowrank else []) + [mla.kv_a_layernorm.weight]
    w_kvb = mla.kv_b_weight().contiguous()  # [H, dn+dv, C]: the layer's own tensor for fp32, dequantized once otherwise
    if None in descs or any(t.dtype != torch.float32 or not t.is_contiguous() for t in norms + [w_kvb]):
        return None
    q_a, q_b = (descs[0], descs[1]) if lowrank else (Lin(), descs[0])
    dims = MLADims(mla.o_proj.out_features, mla.n_heads, mla.nope_dim, mla.rope_dim, mla.v_dim, mla.kv_lora_rank,
                   mla.q_lora_rank or 0, mla.q_a_layernorm.eps if lowrank else 0.0, mla.kv_a_layernorm.eps, mla.scale)
    return (dims, q_a, q_b, descs[-2], descs[-1], norms, w_kvb, keep)


def mla_decode(mla: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: NativeKeys) -> torch.Tensor | None:
    """The layer's output [..., D] for x [..., D] (M = x's rows), or None when it has no native form."""
    p = plan(mla)
    if p is None:
        return None
    dims, q_a, q_b, kv_a, o, norms, w_kvb, _ = p
    xc = x.reshape(-1, x.shape[-1]).contiguous()
    M, S = xc.shape[0], keys.key_slots.shape[1]
    c, s = cos.reshape(M, -1).contiguous(), sin.reshape(M, -1).contiguous()
    H, C = dims.H, dims.C
    scratch = xc.new_empty(M * (dims.Rq + H * (dims.dn + dims.dr) + C + dims.dr + H * (2 * C + dims.dr + S) + H * dims.dv))
    y = xc.new_empty(M, dims.D)
    q_norm = norms[0].data_ptr() if dims.Rq else None
    mask = keys.key_mask
    kernels.library().mla_decode(
        ctypes.byref(dims), xc.data_ptr(), M, ctypes.byref(q_a), q_norm, ctypes.byref(q_b), ctypes.byref(kv_a),
        norms[-1].data_ptr(), w_kvb.data_ptr(), ctypes.byref(o), c.data_ptr(), s.data_ptr(), keys.cache.data_ptr(),
        keys.slot_mapping.data_ptr(), keys.key_slots.data_ptr(), None if mask is None else mask.data_ptr(), S,
        scratch.data_ptr(), y.data_ptr(), torch.get_num_threads())
    return y.view(*x.shape[:-1], dims.D)
