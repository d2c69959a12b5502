"""Rotary position embedding with YaRN, in the interleaved-pair layout DeepSeek weights use.

Only the decoupled rotary slice (`qk_rope_head_dim` dims of each query head and the single shared
rotary key) is rotated. Pairs are (x[2i], x[2i+1]) — GPT-J style, vLLM's `is_neox_style=False` —
and the output stays interleaved, as in DeepSeek's own inference code. Rotation runs in fp32.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dsv3.config import ModelConfig


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies and the cos/sin magnitude (YaRN's attention factor).

    With YaRN, pairs rotating more than `beta_fast` times over the original context keep their
    frequency, pairs rotating fewer than `beta_slow` times are divided by `factor`, and a linear
    ramp blends the pairs in between.
    """
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq, 1.0

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rs.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / rs.factor * ramp + inv_freq * (1 - ramp)
    if rs.mscale and rs.mscale_all_dim:
        attn_factor = _yarn_mscale(rs.factor, rs.mscale) / _yarn_mscale(rs.factor, rs.mscale_all_dim)
    else:
        attn_factor = _yarn_mscale(rs.factor)
    return inv_freq, attn_factor


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for arbitrary positions (no fixed-length table, so any position works)."""

    keep_fp32 = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.attn_factor = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] -> cos, sin of shape [..., dr/2] in fp32."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)
        return angles.cos() * self.attn_factor, angles.sin() * self.attn_factor


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim of x [..., dr]; cos/sin broadcast as [..., dr/2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    if not torch.compiler.is_compiling() and xf.stride(-1) == 1 and xf.stride(-2) % 2 == 0 and xf.storage_offset() % 2 == 0:
        # pairs as complex numbers: one multiply instead of a dozen small ops (decode is op-bound)
        out = torch.view_as_real(torch.view_as_complex(xf) * torch.complex(cos, sin)).flatten(-2)
    else:
        x0, x1 = xf[..., 0], xf[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def apply_rotary_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., dr] in the half-split layout (pairs (x[i], x[i + dr/2])), as DeepSeek-V3.2's indexer does
    while its MLA rotates interleaved pairs; cos/sin broadcast as [..., dr/2]."""
    xf = x.float()
    x0, x1 = xf.chunk(2, dim=-1)
    out = torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def apply_rotary_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last 2·cos.shape[-1] values of x in interleaved pairs, the rest unchanged: DeepSeek-V4 lays each
    head out as [nope | rope] (`x[..., -rd:]` in its inference code). `-sin` undoes the rotation."""
    rd = 2 * cos.shape[-1]
    return torch.cat([x[..., :-rd], apply_rotary(x[..., -rd:], cos, sin)], dim=-1)
