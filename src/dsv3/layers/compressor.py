"""DeepSeek-V4's KV compressor: `ratio` consecutive tokens pooled into one cache entry by learned softmax gates.

Follows the official V4 inference code (`Compressor`) and the V4 report §2.3. Each token t projects
kv_t = wkv(x_t) and a gate score z_t = wgate(x_t) + ape[t mod ratio] (in fp32). Entry w pools window
[w·ratio, (w+1)·ratio), per feature, with weights softmax over the window's tokens:

    C_w = Σ_j softmax_j(z_j) ⊙ kv_j                               (HCA, ratio 128: windows side by side)
    C_w = Σ over 2·ratio slots: window w−1's first halves [:d] and window w's second halves [d:]
                                                                  (CSA, ratio 4: overlapping windows;
                                                                   wkv / wgate / ape are 2·d wide)

then RMSNorm and the rotary on the entry's last `rope_dim` values at position w·ratio (the window's first
token). Entry w exists once its window is complete; it is built from tokens ≤ (w+1)·ratio − 1 only.

`pool` is the one implementation of the pooling, for a whole sequence and for a decode step alike: it
appends T new tokens' rows to a per-sequence carry (official layout, `kv_state` / `score_state`
[B, coff·ratio, coff·d]: rows [0, ratio) the last complete window, kept for the overlap; rows from
`ratio·overlap` on the current, incomplete window) and returns the entries the new tokens completed.
The official code also rounds entries to FP8 (the main compressor's non-rotary values) or rotates them
by a Hadamard matrix and rounds to FP4 (the indexer's), simulating its quantization-aware training; dsv3
keeps full precision there, as transformers does (the Hadamard rotation alone is orthogonal and cancels in
the indexer's dot products).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3.layers.linear import Linear
from dsv3.layers.norm import RMSNorm
from dsv3.layers.rope import apply_rotary_tail


def pool(kv: torch.Tensor, score: torch.Tensor, carry_kv: torch.Tensor, carry_score: torch.Tensor, start: int,
         ratio: int, overlap: bool) -> torch.Tensor:
    """Append T tokens' rows kv / score [B, T, coff·d] (fp32, ape added) at positions start.. to the carry (updated
    in place) and return the pooled entries their completed windows make [B, n, d] (n may be 0)."""
    B, T, cd = kv.shape
    off, cur = (ratio if overlap else 0), start % ratio
    full_kv = torch.cat([carry_kv[:, off:off + cur], kv], dim=1)
    full_sc = torch.cat([carry_score[:, off:off + cur], score], dim=1)
    n = (cur + T) // ratio
    d = cd // 2 if overlap else cd
    pooled = kv.new_zeros(B, 0, d)
    if n:
        win_kv = full_kv[:, :n * ratio].view(B, n, ratio, cd)
        win_sc = full_sc[:, :n * ratio].view(B, n, ratio, cd)
        if overlap:  # window w-1's first halves next to window w's second halves: 2·ratio slots
            prev_kv = torch.cat([carry_kv[:, None, :ratio], win_kv[:, :-1]], dim=1)
            prev_sc = torch.cat([carry_score[:, None, :ratio], win_sc[:, :-1]], dim=1)
            slots_kv = torch.cat([prev_kv[..., :d], win_kv[..., d:]], dim=2)
            slots_sc = torch.cat([prev_sc[..., :d], win_sc[..., d:]], dim=2)
        else:
            slots_kv, slots_sc = win_kv, win_sc
        pooled = (slots_kv * slots_sc.softmax(dim=2)).sum(dim=2)
        if overlap:
            carry_kv[:, :ratio], carry_score[:, :ratio] = win_kv[:, -1], win_sc[:, -1]
    rem = full_kv.shape[1] - n * ratio
    carry_kv[:, off:off + rem] = full_kv[:, n * ratio:]
    carry_score[:, off:off + rem] = full_sc[:, n * ratio:]
    return pooled


def empty_carry(batch: int, ratio: int, head_dim: int, overlap: bool, device: torch.device | str = "cpu"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh carry (kv_state zeros, score_state -inf: an absent previous window weighs nothing), fp32."""
    c = 1 + int(overlap)
    kv = torch.zeros(batch, c * ratio, c * head_dim, dtype=torch.float32, device=device)
    return kv, torch.full_like(kv, float("-inf"))


class FP32Linear(Linear):
    """A projection `cast` leaves in fp32 (the official code keeps the compressors' wkv / wgate in fp32)."""

    keep_fp32 = True


class Compressor(nn.Module):
    """wkv, wgate, ape and norm with the official checkpoint names; fp32 as the official code keeps them."""

    keep_fp32 = True

    def __init__(self, dim: int, head_dim: int, ratio: int, overlap: bool, eps: float):
        super().__init__()
        self.head_dim, self.ratio, self.overlap = head_dim, ratio, overlap
        c = 1 + int(overlap)
        self.wkv = FP32Linear(dim, c * head_dim)
        self.wgate = FP32Linear(dim, c * head_dim)
        self.ape = nn.Parameter(torch.empty(ratio, c * head_dim))
        self.norm = RMSNorm(head_dim, eps)

    def project(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] at positions start.. -> (kv, gate score + ape) [B, T, coff·d], fp32."""
        xf = x.float()
        kv, score = self.wkv(xf).float(), self.wgate(xf).float()
        ape = self.ape.float()[(torch.arange(x.shape[1], device=x.device) + start) % self.ratio]
        return kv, score + ape

    def finish(self, pooled: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Pooled windows [B, n, d] -> entries: RMSNorm, then the rotary (cos/sin of the windows' first positions)."""
        return apply_rotary_tail(self.norm(pooled.to(dtype)), cos, sin)
