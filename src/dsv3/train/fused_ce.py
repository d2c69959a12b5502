"""Cross-entropy of the LM head without the [tokens, vocab] logits: `linear_cross_entropy`.

In a small model the vocabulary projection is most of a training step: the head's matmul is
`vocab / hidden` times wider than any other, and the logits (and their log-softmax and its
gradient) are tensors of tokens × vocab floats written and read several times. Here the rows
go through in chunks; each chunk's gradient (softmax − one-hot) is formed right after its loss,
so backward only scales the two stored gradients. Optionally the two matmuls run in bfloat16
(fp32 accumulation; the softmax stays fp32): that is what AMX/Tensor Cores are fast at.
"""

from __future__ import annotations

import torch

from dsv3.data.packing import IGNORE_INDEX


def bf16_matmul_is_fast(device: torch.device) -> bool:
    """bfloat16 matmuls are native here: CUDA, or a CPU with AMX or AVX512-BF16."""
    if device.type == "cuda":
        return True
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return device.type == "cpu" and any(getattr(cpu, p, lambda: False)() for p in probes)


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk: int,
                dtype: torch.dtype | None) -> torch.Tensor:
        dtype = dtype or h.dtype
        acc = torch.promote_types(h.dtype, torch.float32)  # softmax and sums: fp32 at least
        hm, wm = h.to(dtype), w.to(dtype)
        valid = targets != IGNORE_INDEX
        count = int(valid.sum())
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device)
        loss = torch.zeros((), dtype=acc, device=h.device)
        for i in range(0, h.shape[0], chunk):
            hc, t, ok = hm[i:i + chunk], targets[i:i + chunk], valid[i:i + chunk]
            logits = (hc @ wm.t()).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            rows = ok.nonzero().squeeze(1)
            loss += (lse[rows] - logits[rows, t[rows]]).sum()
            p = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            p[rows, t[rows]] -= 1.0
            p[~ok] = 0.0
            p = p.to(dtype)
            grad_h[i:i + chunk] = (p @ wm).to(h.dtype)
            grad_w += (p.t() @ hc).to(acc)
        scale = 1.0 / max(count, 1)
        ctx.save_for_backward(grad_h.mul_(scale), grad_w.mul_(scale).to(w.dtype))
        return loss * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad, grad_w * grad, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean CE of `h @ weight.T` against `targets` (IGNORE_INDEX skipped); h [..., D], weight [V, D].

    `dtype` is the matmul dtype (None: h's). Without autograd it only computes the loss.
    """
    h2, t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCE.apply(h2, weight, t, chunk, dtype)
    acc = torch.promote_types(h.dtype, torch.float32)
    with torch.no_grad():
        total, n = h2.new_zeros((), dtype=acc), int((t != IGNORE_INDEX).sum())
        for i in range(0, h2.shape[0], chunk):
            tc = t[i:i + chunk]
            logits = (h2[i:i + chunk].to(dtype or h.dtype) @ weight.to(dtype or h.dtype).t()).to(acc)
            ok = (tc != IGNORE_INDEX).nonzero().squeeze(1)
            total += (torch.logsumexp(logits[ok], dim=-1) - logits[ok, tc[ok]]).sum()
        return total / max(n, 1)
