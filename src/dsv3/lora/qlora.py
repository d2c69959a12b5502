"""QLoRA: train LoRA adapters over a frozen int8 / int4 base (arXiv 2305.14314, without NF4).

The base is quantized in place by `dsv3.quant` (weight-only, packed kernels), so only the packed
weights stay resident. Gradients still have to flow *through* every frozen layer to reach the
adapters below it: `QuantLinear` carries its own backward (dX = dY · dequant(W)), and routed experts
get one here by recomputation — the backward dequantizes the layer's active experts, replays the
MoE in dense form and takes its vector-Jacobian product, then drops the dense weights again.
The adapters are ordinary fp32 LoRA pairs: saved in PEFT format they are deltas on the
full-precision weights, so they load on the unquantized base (with the quantization error as the
only difference).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3.lora.apply import replace_module
from dsv3.lora.experts import ExpertsLoRA
from dsv3.quant.apply import quantize_model
from dsv3.quant.experts import PROJ, QuantExperts
from dsv3.quant.linear import dequant

METHODS = ("none", "int8", "int4")


class _DenseExperts(nn.Module):
    """Stacked dense expert weights (gate_up [E, 2·Im, D], down [E, D, Im]) in `Experts`' layout."""

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor):
        super().__init__()
        self.register_buffer("gate_up_proj", gate_up_proj)
        self.register_buffer("down_proj", down_proj)


class _QuantExpertsFn(torch.autograd.Function):
    """Forward through the packed experts; backward by recomputing with the active experts dequantized."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weights: torch.Tensor, experts: QuantExperts, idx: torch.Tensor) -> torch.Tensor:
        ctx.experts = experts
        ctx.save_for_backward(x, weights, idx)
        return experts(x, idx, weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weights, idx = ctx.saved_tensors
        e = ctx.experts
        active, local = idx.unique(return_inverse=True)  # only the experts this batch routed to
        w = {p: dequant(e.fmt, e.proj(p, active), *e.shapes[p]).to(x.dtype) for p in PROJ}
        dense = ExpertsLoRA(_DenseExperts(torch.cat([w["gate_proj"], w["up_proj"]], dim=1), w["down_proj"]), {})
        with torch.enable_grad():
            xd, wd = x.detach().requires_grad_(), weights.detach().requires_grad_()
            dx, dw = torch.autograd.grad(dense(xd, local, wd), (xd, wd), grad)
        return dx, dw, None, None


class TrainableQuantExperts(nn.Module):
    """Frozen packed routed experts that gradients can pass through (to the hidden states and routing weights)."""

    def __init__(self, base: QuantExperts):
        super().__init__()
        self.base_layer = base

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad):
            return _QuantExpertsFn.apply(x, weights, self.base_layer, idx)
        return self.base_layer(x, idx, weights)


def quantize_base(model: nn.Module, method: str, group_size: int = 128) -> dict:
    """Quantize the decoder's linears and expert stacks in place (int8 | int4) and make the experts trainable-through.

    Embeddings, norms, the fp32 router and the LM head stay in full precision, as `dsv3 quantize` keeps them.
    """
    qc = quantize_model(model, method, group_size=group_size, progress=False)
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantExperts) and not name.endswith(".base_layer"):
            replace_module(model, name, TrainableQuantExperts(m))
    for p in model.parameters():
        p.requires_grad_(False)
    return qc
