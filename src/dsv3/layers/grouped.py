"""Grouped matmuls: rows sorted by group (expert), each group times its own weight, in one call.

`grouped_linear` is the forward (PyTorch's grouped_mm, traceable by torch.compile on CPU through an
opaque custom op with its own backward); `grouped_matmul` is the same wherever autograd records
outside torch.compile: torch's CPU grouped_mm has no working backward and the CUDA kernel takes bf16
only, so frozen weights get a hand-written backward and trainable ones one matmul per non-empty group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("dsv3::grouped_mm", mutates_args=())
def _grouped_mm(x: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """F.grouped_mm as an opaque op, so torch.compile can trace the MoE on CPU in fp32
    (the op's own fake-tensor rule accepts only the bf16 CUDA case)."""
    return F.grouped_mm(x, w_t, offs=offs)


@_grouped_mm.register_fake
def _(x: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w_t.shape[-1])


@torch.library.custom_op("dsv3::grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-group x_gᵀ · grad_g -> [G, in, out]: the weight gradient of `_grouped_mm`."""
    return F.grouped_mm(x.t(), grad, offs=offs)


@_grouped_mm_wgrad.register_fake
def _(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor, groups: int) -> torch.Tensor:
    return x.new_empty(groups, x.shape[1], grad.shape[1])


def _grouped_mm_backward(ctx, grad: torch.Tensor):
    x, w_t, offs = ctx.saved_tensors
    dx = _grouped_mm(grad, w_t.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    dw = _grouped_mm_wgrad(x, grad, offs, w_t.shape[0]) if ctx.needs_input_grad[1] else None
    return dx, dw, None


def _grouped_mm_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


_grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by group, group g = rows [offs[g-1], offs[g]); w [G, out, in] -> [rows, out]."""
    aligned = (x.shape[-1] * x.element_size()) % 16 == 0 and (w.shape[1] * w.element_size()) % 16 == 0
    if aligned and x.dtype == w.dtype:
        if torch.compiler.is_compiling():
            return _grouped_mm(x, w.transpose(1, 2), offs)
        return F.grouped_mm(x, w.transpose(1, 2), offs=offs)
    # Fallback for odd widths/dtypes the grouped kernel rejects: one matmul per non-empty expert.
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ w[g].to(x.dtype).T
        start = end
    return out


class _GroupedFrozen(torch.autograd.Function):
    """Grouped matmul with a frozen weight: backward is one more grouped matmul (dx = dy · W_g), no dW."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w, offs)
        return grouped_linear(x, w, offs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w, offs = ctx.saved_tensors
        return grouped_linear(grad.contiguous(), w.transpose(1, 2), offs), None, None


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`grouped_linear`, differentiable on every backend when autograd is recording (outside torch.compile, whose
    custom op has its own backward).

    torch's CPU `grouped_mm` has no working backward, and the CUDA kernel takes bf16 only: frozen expert
    weights get a hand-written backward; trainable (LoRA) ones run one matmul per non-empty expert.
    """
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad) and not torch.compiler.is_compiling()
    kernel_ok = x.dtype == w.dtype and (x.dtype == torch.bfloat16 or not x.is_cuda)
    if kernel_ok and (not needs_grad or x.is_cuda):
        return grouped_linear(x, w, offs)
    if kernel_ok and not w.requires_grad:  # frozen experts: keep the grouped kernel, supply its backward
        return _GroupedFrozen.apply(x, w, offs)
    sizes = torch.diff(offs.long(), prepend=offs.new_zeros(1).long()).tolist()
    parts = [chunk @ w[g].to(x.dtype).T for g, chunk in enumerate(torch.split(x, sizes)) if chunk.shape[0]]
    return torch.cat(parts) if parts else x.new_zeros(0, w.shape[1])
