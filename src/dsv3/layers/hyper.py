"""Manifold-constrained hyper-connections (mHC), DeepSeek-V4's residual: `hc_mult` copies of the hidden state.

Follows the official V4 inference code (`Block.hc_pre` / `hc_post`, `ParallelHead.hc_head`, and the
`hc_split_sinkhorn` kernel) and the V4 report §2.2. Each block reads the n streams x [..., n, D] through

    mixes = (x_flat · fnᵀ) / rms(x_flat)                    x_flat: the n·D values, fn: [(2 + n)·n, n·D]
    pre   = sigmoid(mixes[:n]  · scale[0] + base[:n]) + eps
    post  = 2 · sigmoid(mixes[n:2n] · scale[1] + base[n:2n])
    comb  = Sinkhorn(softmax_rows(mixes[2n:] · scale[2] + base[2n:]) + eps)    n × n, near doubly stochastic

feeds its sub-layer (attention or MoE) `Σ_i pre_i x_i`, and leaves `out_k = post_k · f + Σ_i comb[i, k] · x_i`.
Sinkhorn is the kernel's: one column normalisation, then `iters - 1` row-and-column rounds, each sum + eps.
The model's head collapses the streams with `pre` alone (`hc_head`). All of it runs in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3 import ops


def _mixes(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """x [..., n, D] -> fn · x_flat / rms(x_flat) in fp32 [..., rows of fn]."""
    flat = x.flatten(-2).float()
    return F.linear(flat, fn.float()) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)


def sinkhorn_split(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, n: int, iters: int,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pre [..., n], post [..., n], comb [..., n, n]) from the mixes [..., (2 + n)·n], as the official kernel. Without
    autograd on CPU one native call (`dsv3::hc_sinkhorn`); the PyTorch below is ~120 small ops (20 rounds)."""
    native = ops.hc_sinkhorn(mixes, scale, base, n, iters, eps)
    if native is not None:
        return native
    scale, base = scale.float(), base.float()
    pre = torch.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + eps
    post = 2 * torch.sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n])
    comb = mixes[..., 2 * n:].unflatten(-1, (n, n)) * scale[2] + base[2 * n:].view(n, n)
    comb = comb.softmax(-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return pre, post, comb


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int, eps: float,
           norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Streams x [..., n, D] -> (the sub-layer's input Σ pre_i x_i [..., D] in x's dtype, post, comb)."""
    n = x.shape[-2]
    pre, post, comb = sinkhorn_split(_mixes(x, fn, norm_eps), scale, base, n, iters, eps)
    y = (pre.unsqueeze(-1) * x.float()).sum(-2)
    return y.to(x.dtype), post, comb


def hc_post(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """The sub-layer's output f [..., D] and the streams it read [..., n, D] -> the new streams:
    out_k = post_k · f + Σ_i comb[i, k] · residual_i."""
    mixed = torch.matmul(comb.transpose(-1, -2), residual.float())  # [..., n(k), D] = Σ_i comb[i, k] res_i
    return (post.unsqueeze(-1) * f.float().unsqueeze(-2) + mixed).to(f.dtype)


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, eps: float,
            norm_eps: float) -> torch.Tensor:
    """The final collapse of the streams [..., n, D] -> [..., D]: pre = sigmoid(mixes · scale + base) + eps."""
    pre = torch.sigmoid(_mixes(x, fn, norm_eps) * scale.float() + base.float()) + eps
    return (pre.unsqueeze(-1) * x.float()).sum(-2).to(x.dtype)
