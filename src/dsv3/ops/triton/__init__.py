"""The CUDA backend of the `dsv3::` ops: Triton kernels (and maintained packages behind them when installed).

`register()` installs, once per process, CUDA implementations of

* `dsv3::mla_attend`  absorbed MLA decode over cache slots, dense or DSA top-k (`mla.py`; FlashMLA when
  installed and the cache is paged in 64-slot blocks, through `mla_decode_paged`),
* `dsv3::fused_moe`   routed experts: sorted tokens, gate/up + SiLU, down, weighted combine (`moe.py`),
* `dsv3::fp8_gemm`    FP8 e4m3 128×128 block-scaled W8A8 GEMM (`fp8.py`; DeepGEMM when installed),
* `dsv3::route_noaux` V3's sigmoid, bias-corrected, group-limited router (`router.py`; sgl-kernel when installed).

Their PyTorch references (`dsv3.ops.reference`) stay registered for every other device. Each kernel is
tested on CPU under TRITON_INTERPRET=1 against its reference (`pytest -m triton`). Triton is optional:
without it (or without CUDA) the references run and `available()` is False.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger("dsv3.ops")

__all__ = ["available", "mla_decode_paged", "register", "registered"]


@functools.cache
def importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def available() -> bool:
    """Whether the Triton kernels can run on a GPU here (triton installed, CUDA present)."""
    return importable() and torch.cuda.is_available()


_registered = False
_lib: torch.library.Library | None = None


def registered() -> bool:
    return _registered


def register() -> bool:
    """Register the CUDA implementations (idempotent); False when Triton is not installed."""
    global _registered, _lib
    if _registered:
        return True
    if not importable():
        return False
    from dsv3.ops import schemas  # noqa: F401  (the ops must be declared first)

    lib = torch.library.Library("dsv3", "IMPL")
    lib.impl("mla_attend", _mla_attend, "CUDA")
    lib.impl("fused_moe", _fused_moe, "CUDA")
    lib.impl("fp8_gemm", _fp8_gemm, "CUDA")
    lib.impl("route_noaux", _route_noaux, "CUDA")
    _lib, _registered = lib, True
    return True


def _mla_attend(q, cache, key_slots, key_lens, kv_lora_rank, scale):
    from dsv3.ops import reference
    from dsv3.ops.triton.mla import mla_decode

    if cache.dtype not in (torch.bfloat16, torch.float16, torch.float32) or q.dtype != cache.dtype:
        return reference.mla_attend(q, cache, key_slots, key_lens, kv_lora_rank, scale)
    return mla_decode(q, cache, key_slots, key_lens, kv_lora_rank, scale)


def _fused_moe(x, w13, w2, topk_ids, topk_weights):
    from dsv3.ops import reference
    from dsv3.ops.triton.moe import fused_moe

    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or w13.dtype != x.dtype or w2.dtype != x.dtype:
        return reference.fused_moe(x, w13, w2, topk_ids, topk_weights)
    return fused_moe(x, w13, w2, topk_ids, topk_weights)


def _fp8_gemm(x, weight, scale_inv):
    from dsv3.ops.triton import vendor
    from dsv3.ops.triton.fp8 import fp8_gemm

    K = weight.shape[1]
    if vendor.module("deep_gemm") is not None and x.dtype == torch.bfloat16:
        x2 = x.reshape(-1, K)
        y = vendor.checked("deep_gemm", lambda: vendor.deep_gemm_fp8(x2, weight, scale_inv),
                           lambda: fp8_gemm(x2, weight, scale_inv))
        if y is not None:
            return y.view(*x.shape[:-1], weight.shape[0])
    return fp8_gemm(x, weight, scale_inv)


def _route_noaux(x, weight, bias, n_group, topk_group, top_k, norm, scale):
    from dsv3.ops import reference
    from dsv3.ops.triton import router, vendor

    E = weight.shape[0]
    if not router.supported(E, n_group):
        return reference.route_noaux(x, weight, bias, n_group, topk_group, top_k, norm, scale)
    logits = x.reshape(-1, x.shape[-1]).float() @ weight.float().T
    b = None if bias is None else bias.float().contiguous()
    if vendor.module("sgl_kernel") is not None and b is not None and norm and n_group > 1:
        K = top_k

        def pack(w_ids):  # weights and ids side by side, so the one-time check compares both
            return torch.cat([w_ids[0], w_ids[1].float()], 1)

        got = vendor.checked("sgl_kernel", lambda: pack(vendor.sgl_route(logits, b, n_group, topk_group, K, scale)),
                             lambda: pack(router.select(logits, b, n_group, topk_group, K, norm, scale)))
        if got is not None:
            return got[:, :K].contiguous(), got[:, K:].long(), logits.sigmoid()
    return router.select(logits, b, n_group, topk_group, top_k, norm, scale)


def mla_decode_paged(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                     block_size: int, kv_lora_rank: int, scale: float) -> torch.Tensor:
    """Dense MLA decode over a paged cache given as a block table (FlashMLA's interface): FlashMLA when installed,
    bf16 and 64-slot blocks, else `dsv3::mla_attend` over the slots the table names."""
    from dsv3.ops.triton import vendor
    from dsv3.ops.triton.mla import slots_from_block_table

    width = block_table.shape[1] * block_size
    slots = slots_from_block_table(block_table, block_size, width)
    ours = lambda: torch.ops.dsv3.mla_attend(q, cache, slots, seq_lens, kv_lora_rank, scale)  # noqa: E731
    if q.is_cuda and block_size == 64 and q.dtype == torch.bfloat16 and vendor.module("flash_mla") is not None:
        got = vendor.checked("flash_mla", lambda: vendor.flash_mla(q, cache, block_table, seq_lens, kv_lora_rank, scale), ours)
        if got is not None:
            return got
    return ours()
