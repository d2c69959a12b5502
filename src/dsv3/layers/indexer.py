"""The lightning indexer of DeepSeek Sparse Attention (DSA, DeepSeek-V3.2).

Each attention layer scores every past token for each query with a few small heads and keeps the
top-`index_topk`; MLA then attends only to those. Following the official inference code
(deepseek-ai/DeepSeek-V3.2-Exp, `inference/model.py`, as fixed in Nov 2025):

    q = wq_b(q_resid) split per index head, k = LayerNorm(wk(x))  (one key per token, shared by the heads)
    rotary on the first qk_rope_head_dim values of q and k, in the half-split layout (MLA uses interleaved pairs)
    score(s, t) = Σ_h w_h(s) · relu(q_h(s) · k(t)),   w(s) = weights_proj(x_s) · H_idx^-1/2 · D_idx^-1/2

with the causal mask added before the top-k. The reference rotates q and k by a Hadamard matrix and
quantizes them to FP8 (128-value blocks, one scale each) before scoring; the rotation is orthogonal,
so in fp32 (the default here) it changes nothing, and `index_fp8` reproduces the reference's FP8
rounding (Hadamard, e4m3 with a per-vector scale, dequantized) for users who want its exact numbers.
Which tokens are kept is decided by the attention context (`dsv3.attention`), which holds the keys.
"""

from __future__ import annotations

import math
import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.layers.linear import Linear
from dsv3.layers.rope import apply_rotary_half

FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """x · H / sqrt(n) over the last dim (n a power of two): the orthonormal Walsh-Hadamard transform."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two size, got {n}")
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        y = torch.cat((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=-1).view(-1, n)
        h *= 2
    return (y / math.sqrt(n)).view(x.shape)


def fp8_round(x: torch.Tensor) -> torch.Tensor:
    """The reference's activation quantization of q and k: e4m3 with one scale per vector (block = D_idx = 128),
    returned dequantized."""
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-4) / FP8_MAX
    return (x / scale).to(torch.float8_e4m3fn).to(x.dtype) * scale


class Indexer(nn.Module):
    """DSA's indexer with HF/checkpoint names: wq_b, wk, k_norm (LayerNorm with bias), weights_proj."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.q_lora_rank is None:
            raise ValueError("the DSA indexer reads the compressed query: q_lora_rank must be set")
        self.n_heads, self.head_dim, self.rope_dim = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        self.topk, self.fp8 = cfg.index_topk, cfg.index_fp8
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim)
        self.wk = Linear(cfg.hidden_size, self.head_dim)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = Linear(cfg.hidden_size, self.n_heads)  # never quantized: its weights pick the top-k
        self.scale = self.head_dim ** -0.5

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = self.rope_dim
        return torch.cat([apply_rotary_half(x[..., :r], cos, sin), x[..., r:]], dim=-1)

    def forward(self, x: torch.Tensor, q_resid: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D], q_resid [B, T, q_lora_rank], cos/sin [B, T, dr/2] -> (queries [B, T, Hi, Di], head weights
        [B, T, Hi] with the scales folded in, this step's keys [B, T, Di])."""
        B, T, _ = x.shape
        q = self._rope(self.wq_b(q_resid).view(B, T, self.n_heads, self.head_dim), cos[:, :, None], sin[:, :, None])
        k = self._rope(self.k_norm(self.wk(x)), cos, sin)
        if self.fp8:
            q, k = fp8_round(hadamard(q)), fp8_round(hadamard(k))
        w = self.weights_proj(x.to(self.weights_proj.weight.dtype)).float() * (self.n_heads ** -0.5 * self.scale)
        return q, w, k
