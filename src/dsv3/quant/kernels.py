"""PyTorch's packed weight-only matmul kernels, and the int4 layout they want.

On CPU, `_weight_int8pack_mm` multiplies by int8 rows with one scale per row, and
`_weight_int4pack_mm_for_cpu` by int4 weights in an ISA-specific blocked layout produced by
`_convert_weight_to_int4pack_for_cpu`, with per-group (scale, zero) pairs where
w = (u − 8) · scale + zero. Elsewhere we dequantize and use a dense matmul (correct, not fast).

The blocked int4 layout is a permutation of nibbles that differs between AVX2 and AVX-512 builds,
so it is never written to disk: `int4_unpack` recovers the plain values by packing index probes
on the running machine and inverting the permutation.

Both CPU kernels are fast only with bf16 activations (measured on AVX-512 VNNI, 1 thread, weights
not cache-resident: int8 1.65×, int4 3.5× faster than an fp32 matvec, but 2–5× *slower* than it
with fp32 activations). So by default activations are rounded to bf16 for the kernel call and the
result cast back (`KERNEL_ACT_DTYPE`; set it to None to run the kernels in the input dtype). From
`DEQUANT_MIN_ROWS` fp32 rows (prefill, scoring) int8 weights are instead dequantized for one fp32 GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3 import ops
from dsv3.ops.forms import NativeLinear

from dsv3.quant.schemes import ceil_to, pack_nibbles, unpack_nibbles

INT4_ROW_MULTIPLE = 16  # the CPU int4 kernel needs N divisible by 16; extra rows are zero
KERNEL_ACT_DTYPE: torch.dtype | None = torch.bfloat16
# From this many fp32 rows, dequantizing the int8 weight (transiently) and using the fp32 GEMM beats the bf16
# int8 kernel and rounds nothing (`python bench/int8_prefill.py`: 1.0-1.4x at 64 rows, 1.8-2.6x at 512).
DEQUANT_MIN_ROWS = 64
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    return (x if KERNEL_ACT_DTYPE is None else x.to(KERNEL_ACT_DTYPE)).contiguous()


def has_cpu_kernels() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm") and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


# ---- int8 -------------------------------------------------------------------------------------
def int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (q [N, K] · scale [N])ᵀ -> [M, N] in x's dtype."""
    y = ops.linear(x, NativeLinear(1, q, scale)) if ops.native(x) and q.is_cpu else None
    if y is not None:  # a decode step: fp32 activations, no bf16 round trip
        return y
    if x.dtype == torch.float32 and x.shape[0] >= DEQUANT_MIN_ROWS:  # prefill: exact, and faster than the bf16 kernel
        return F.linear(x, q.to(torch.float32) * scale.to(torch.float32)[:, None])
    if x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES and x.shape[-1] % 16 == 0:
        # K % 16 != 0 gives wrong sums (and K = 8 a crash) in torch 2.13's bf16 int8 kernel: dense fallback.
        xk = _kernel_input(x)
        return torch.ops.aten._weight_int8pack_mm(xk, q, scale.to(xk.dtype)).to(x.dtype)
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)


# ---- int4 -------------------------------------------------------------------------------------
def int4_scale_zeros(scale: torch.Tensor, zero: torch.Tensor, rows: int) -> torch.Tensor:
    """(scale, zero point) [..., N, G] -> the kernel's [..., G, rows, 2] with zero' = (8 − z) · s (fp32)."""
    s, z = scale.float(), zero.float()
    pad = rows - s.shape[-2]
    s = F.pad(s, (0, 0, 0, pad))
    z = F.pad(z, (0, 0, 0, pad), value=8.0)
    return torch.stack([s, (8.0 - z) * s], dim=-1).transpose(-3, -2).contiguous()


def split_scale_zeros(scz: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `int4_scale_zeros`: [..., G, Np, 2] -> (scale fp32, zero uint8) [..., rows, G]."""
    s = scz[..., 0].transpose(-1, -2)[..., :rows, :].float()
    zf = scz[..., 1].transpose(-1, -2)[..., :rows, :].float()
    safe = torch.where(s != 0, s, torch.ones_like(s))
    z = torch.where(s != 0, 8.0 - torch.round(zf / safe), torch.full_like(s, 8.0))
    return s.contiguous(), z.clamp(0, 15).to(torch.uint8)


def int4_pack(u: torch.Tensor, kernel: bool) -> torch.Tensor:
    """Values [N, Kp] (0..15) -> [Np, Kp/2] uint8: the CPU kernel's layout, or the plain nibble layout."""
    Np = ceil_to(u.shape[0], INT4_ROW_MULTIPLE)
    u = F.pad(u.to(torch.int32), (0, 0, 0, Np - u.shape[0]), value=8)
    if kernel:
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1)
    return pack_nibbles(u)


def _kernel_source_index(Np: int, Kp: int) -> torch.Tensor:
    """For each nibble of the kernel layout (low then high, byte by byte), its row-major index in [Np, Kp]."""
    n = Np * Kp
    idx = torch.arange(n, dtype=torch.int64)
    src = torch.zeros(n, dtype=torch.int64)
    shift = 0
    while (1 << shift) < n:
        probe = ((idx >> shift) & 15).to(torch.int32).view(Np, Kp)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
        src |= unpack_nibbles(packed).flatten().to(torch.int64) << shift
        shift += 4
    return src


def int4_unpack(packed: torch.Tensor, kernel: bool) -> torch.Tensor:
    """Inverse of `int4_pack` (before row padding is dropped): [Np, Kp/2] -> values [Np, Kp] uint8."""
    if not kernel:
        return unpack_nibbles(packed)
    Np, Kp = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(Np * Kp, dtype=torch.uint8)
    out[_kernel_source_index(Np, Kp)] = unpack_nibbles(packed.cpu()).flatten()
    return out.view(Np, Kp).to(packed.device)


def int4_dequant(packed: torch.Tensor, scz: torch.Tensor, kernel: bool) -> torch.Tensor:
    """[Np, Kp] fp32 weights, padding rows included: (u − 8) · s + zero', exactly as the kernel computes."""
    u = int4_unpack(packed, kernel).float()
    G = scz.shape[0]
    s, zf = scz[..., 0].t().float(), scz[..., 1].t().float()  # [Np, G]
    return ((u.unflatten(-1, (G, -1)) - 8.0) * s[..., None] + zf[..., None]).flatten(-2)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, scz: torch.Tensor, group_size: int, out_features: int,
            kernel: bool) -> torch.Tensor:
    """x [M, K] -> [M, out_features]; x is zero-padded to the packed Kp."""
    Kp = packed.shape[1] * 2
    if x.shape[-1] != Kp:
        x = F.pad(x, (0, Kp - x.shape[-1]))
    if kernel and x.dtype in _KERNEL_DTYPES:
        xk = _kernel_input(x)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xk, packed, group_size, scz.to(xk.dtype)).to(x.dtype)
    else:
        y = F.linear(x, int4_dequant(packed, scz, kernel).to(x.dtype))
    return y[:, :out_features]
