"""QLoRA: train LoRA adapters over a frozen int8 / int4 base (arXiv 2305.14314, without NF4).

The base is quantized in place by `dsv3.quant` (weight-only, packed kernels), so only the packed
weights stay resident. Gradients still have to flow *through* every frozen layer to reach the
adapters below it: `QuantLinear` and `QuantExperts` carry their own backward (dX = dY · dequant(W),
the experts' with only the active experts dequantized, and dropped again).
The adapters are ordinary fp32 LoRA pairs: saved in PEFT format they are deltas on the
full-precision weights, so they load on the unquantized base (with the quantization error as the
only difference).
"""

from __future__ import annotations

from torch import nn

from dsv3.quant.apply import quantize_model

METHODS = ("none", "int8", "int4")


def quantize_base(model: nn.Module, method: str, group_size: int = 128) -> dict:
    """Quantize the decoder's linears and expert stacks in place (int8 | int4) and freeze them.

    Embeddings, norms, the fp32 router and the LM head stay in full precision, as `dsv3 quantize` keeps them.
    """
    qc = quantize_model(model, method, group_size=group_size, progress=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return qc
