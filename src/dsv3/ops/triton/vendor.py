"""Maintained GPU kernels used behind the same ops when installed: FlashMLA, DeepGEMM, sgl-kernel.

None of them installs without a GPU toolchain, so each adapter is imported on first use, and checked
once against dsv3's Triton kernel on the first real call (outside CUDA-graph capture): a package whose
API or numbers differ from what dsv3 expects is switched off with one log line and the Triton kernel
runs instead. `DSV3_GPU_KERNELS=triton` skips them altogether (gpu_bench times both).

* FlashMLA `flash_mla_with_kvcache`: dense absorbed MLA decode over a paged cache of 64-slot blocks, bf16.
* DeepGEMM `fp8_gemm_nt` (older: `gemm_fp8_fp8_bf16_nt`): W8A8 GEMM with 1×128 activation and 128×128
  weight scales (Hopper).
* sgl-kernel `moe_fused_gate`: V3's biased, group-limited sigmoid top-k over gate logits.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any, Callable

import torch

log = logging.getLogger("dsv3.ops")

_state: dict[str, str] = {}  # name -> "ok" | "off"


def enabled() -> bool:
    return os.environ.get("DSV3_GPU_KERNELS", "auto") != "triton"


def module(name: str) -> Any | None:
    """The package `name` when importable and not switched off, else None."""
    if not enabled() or _state.get(name) == "off":
        return None
    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or a broken CUDA extension
        _state[name] = "off"
        return None


def checked(name: str, vendor: Callable[[], torch.Tensor], ours: Callable[[], torch.Tensor],
            rtol: float = 2e-2) -> torch.Tensor | None:
    """vendor() once compared with ours() (then trusted), or None when the package is off or disagrees."""
    state = _state.get(name)
    if state == "off":
        return None
    if state == "ok":
        return vendor()
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return None  # never validate inside a graph capture; the warm-up before it does
    try:
        got = vendor()
        want = ours()
        err = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-6)).item()
        if not err <= rtol:
            raise ValueError(f"max relative difference {err:.3g} from dsv3's Triton kernel")
    except Exception as e:  # noqa: BLE001 -- any failure of an optional package falls back to Triton
        _state[name] = "off"
        log.warning("%s is installed but not used: %s", name, str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        return None
    _state[name] = "ok"
    return got


def flash_mla(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
              kv_lora_rank: int, scale: float) -> torch.Tensor:
    """FlashMLA over a paged cache: q [M, H, C + dr] bf16, cache [slots, C + dr] in 64-slot blocks,
    block_table [M, blocks] int32, seq_lens [M] int32 -> o_lat [M, H, C]."""
    fm = module("flash_mla")
    M, H, W = q.shape
    meta, splits = fm.get_mla_metadata(seq_lens.int(), H, 1)
    out, _ = fm.flash_mla_with_kvcache(q[:, None].contiguous(), cache.view(-1, 64, 1, W), block_table.int(),
                                       seq_lens.int(), kv_lora_rank, meta, splits, softmax_scale=scale, causal=False)
    return out[:, 0]


def deep_gemm_fp8(x2: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """DeepGEMM's W8A8 GEMM for x2 [M, K] (quantized here by dsv3's act_quant) -> [M, N] bf16."""
    from dsv3.ops.triton.fp8 import act_quant

    dg = module("deep_gemm")
    aq, a_s = act_quant(x2)
    if hasattr(dg, "get_col_major_tma_aligned_tensor"):
        a_s = dg.get_col_major_tma_aligned_tensor(a_s)
    out = torch.empty(x2.shape[0], weight.shape[0], dtype=torch.bfloat16, device=x2.device)
    gemm = getattr(dg, "fp8_gemm_nt", None) or getattr(dg, "gemm_fp8_fp8_bf16_nt")
    gemm((aq, a_s), (weight, scale_inv.float()), out)
    return out


def sgl_route(logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, top_k: int,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """sgl-kernel's fused V3 gate over fp32 logits [N, E]: (weights [N, K] normalised and scaled, ids [N, K])."""
    sk = module("sgl_kernel")
    w, ids = sk.moe_fused_gate(logits, bias, n_group, topk_group, top_k, 0, scale)
    return w.float(), ids.long()
