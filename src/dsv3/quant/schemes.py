"""Weight quantizers and the on-disk packings, as plain tensor functions.

Three formats, each a pure function pair (quantize, dequantize) so that kernels, AWQ's search and
the tests share one definition of what a quantized weight *means*:

* int8: symmetric per output row, w ≈ q · s, q ∈ [-127, 127] (what `_weight_int8pack_mm` computes);
* int4: groups of `g` input channels, w ≈ (u − z) · s with u ∈ [0, 15]; symmetric (z = 8,
  s = absmax/7, as AWQ's no-zero-point branch) or asymmetric (per-group zero point, AWQ's default);
* fp8: e4m3 with one fp32 `weight_scale_inv` per 128×128 block, DeepSeek-V3's released layout.

int4 is stored two values per byte along the input dimension: byte j of a row holds column 2j in
its low nibble and column 2j+1 in its high nibble. A row narrower than the requested group, or not a
multiple of it, uses the largest accepted group that divides it (`effective_group`: a 64-wide expert
input gets groups of 64, not one half-empty group of 128); only widths no accepted group divides are
zero-padded to a whole group.
"""

from __future__ import annotations

import torch

from dsv3.errors import DSV3Error

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the CPU int4 kernel accepts
FP8_MAX = 448.0  # largest finite float8_e4m3fn


class QuantError(DSV3Error):
    """A quantization method, option or quantized checkpoint tensor is invalid."""


def check_group_size(group_size: int) -> int:
    if group_size not in INT4_GROUP_SIZES:
        raise QuantError(f"group size {group_size} is not supported (use one of {', '.join(map(str, INT4_GROUP_SIZES))})")
    return group_size


def effective_group(in_features: int, group_size: int) -> int:
    """Group for rows `in_features` wide: the largest accepted size ≤ group_size dividing the width, else group_size (padded)."""
    for g in sorted(INT4_GROUP_SIZES, reverse=True):
        if g <= group_size and in_features % g == 0:
            return g
    return group_size


def ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


# ---- int8, per output channel ------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (q int8 [..., N, K], scale fp32 [..., N]); all-zero rows get scale 1."""
    w = w.float()
    amax = w.abs().amax(-1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[..., None]


# ---- int4, grouped -----------------------------------------------------------------------------
def int4_params(w: torch.Tensor, group_size: int, zero_point: bool,
                clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero) for w [..., N, Kp] (Kp a multiple of the group); `clip` [..., N, Kp/g] caps |w|."""
    g = w.float().unflatten(-1, (-1, group_size))
    if zero_point:
        lo, hi = g.amin(-1), g.amax(-1)
        if clip is not None:
            lo, hi = torch.maximum(lo, -clip), torch.minimum(hi, clip)
        scale = ((hi - lo).clamp(min=1e-5)) / 15.0
        zero = torch.clamp(-torch.round(lo / scale), 0, 15)
    else:
        amax = g.abs().amax(-1)
        if clip is not None:
            amax = torch.minimum(amax, clip)
        scale = amax.clamp(min=1e-5) / 7.0
        zero = torch.full_like(scale, 8.0)
    return scale, zero.to(torch.uint8)


def quantize_int4(w: torch.Tensor, group_size: int, zero_point: bool = True,
                  clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (u uint8 [..., N, Kp] in 0..15, scale fp32 [..., N, Kp/g], zero uint8 [..., N, Kp/g]).

    K is padded with zero columns up to Kp = ceil(K / g) · g (the padded input is zero too).
    """
    K = w.shape[-1]
    Kp = ceil_to(K, group_size)
    w = torch.nn.functional.pad(w.float(), (0, Kp - K))
    scale, zero = int4_params(w, group_size, zero_point, clip)
    g = w.unflatten(-1, (-1, group_size))
    u = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None].float(), 0, 15)
    return u.flatten(-2).to(torch.uint8), scale, zero


def dequantize_int4(u: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, in_features: int | None = None) -> torch.Tensor:
    """(u − z) · s per group; `in_features` drops the padding columns."""
    gs = u.shape[-1] // scale.shape[-1]
    g = u.float().unflatten(-1, (-1, gs))
    w = ((g - zero.float()[..., None]) * scale.float()[..., None]).flatten(-2)
    return w if in_features is None else w[..., :in_features]


def pseudo_quantize_int4(w: torch.Tensor, group_size: int, zero_point: bool = True,
                         clip: torch.Tensor | None = None) -> torch.Tensor:
    """Q(w) in float, same shape as w: what AWQ's searches evaluate candidates with."""
    u, s, z = quantize_int4(w, group_size, zero_point, clip)
    return dequantize_int4(u, s, z, w.shape[-1]).to(w.dtype)


def pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [..., 2M] -> bytes [..., M]: low nibble = even column, high = odd column."""
    u = u.to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: bytes [..., M] -> values [..., 2M]."""
    return torch.stack([p & 15, p >> 4], dim=-1).flatten(-2)


# ---- fp8 e4m3, 128×128 blocks ------------------------------------------------------------------
def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (float8_e4m3fn [N, K], weight_scale_inv fp32 [ceil(N/bn), ceil(K/bk)]); W ≈ Wq · S."""
    (N, K), (bn, bk) = w.shape, block
    Np, Kp = ceil_to(N, bn), ceil_to(K, bk)
    wp = torch.nn.functional.pad(w.float(), (0, Kp - K, 0, Np - N))
    blocks = wp.view(Np // bn, bn, Kp // bk, bk)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(Np, Kp)[:N, :K]
    return q.to(torch.float8_e4m3fn), scale


def expand_blocks(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """Block scales [..., nb, kb] -> per-element [..., N, K]."""
    (N, K), (bn, bk) = shape, block
    return scale.repeat_interleave(bn, -2)[..., :N, :].repeat_interleave(bk, -1)[..., :K]


def dequantize_fp8_block(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """W[..., n, k] = fp32(Wq[..., n, k]) · S[..., n // bn, k // bk]."""
    (N, K), (bn, bk) = q.shape[-2:], block
    if N % bn == 0 and K % bk == 0:  # one broadcast multiply over a block view, no expanded scale tensor
        blocks = q.float().view(*q.shape[:-2], N // bn, bn, K // bk, bk)
        return (blocks * scale.float()[..., :, None, :, None]).view(q.shape)
    return q.float() * expand_blocks(scale.float(), (N, K), block)
