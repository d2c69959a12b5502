"""Linear layers and the linear-method protocol every weight format implements.

DeepSeek's projections have no bias. Besides `forward`, a projection in dsv3 offers

* `dense_weight()`: the weight as a dense [out, in] tensor in the activation dtype (absorbed MLA
  folds `kv_b_proj` into the query and output this way, whatever the format);
* `native_form()`: how the native kernels read it (`dsv3.ops.forms.NativeLinear`), or None.

`Linear` (fp32/bf16/fp16 weights), `dsv3.quant.linear.QuantLinear` (int8, int4, AWQ, FP8),
`dsv3.lora.layers.LoRALinear` and the tensor-parallel linears of `dsv3.parallel.layers` implement
it; `LinearMethod` states it, so code that needs it asks for it by type.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from dsv3.ops.forms import NativeLinear, f32_cpu


@runtime_checkable
class LinearMethod(Protocol):
    in_features: int
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def dense_weight(self) -> torch.Tensor: ...

    def native_form(self) -> NativeLinear | None: ...


class Linear(nn.Linear):
    """`nn.Linear` without bias (a subclass, so PEFT and `isinstance(m, nn.Linear)` code treat it as one)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, **kw):
        super().__init__(in_features, out_features, bias=bias, **kw)

    def dense_weight(self) -> torch.Tensor:
        return self.weight

    def native_form(self) -> NativeLinear | None:
        """fp32 on the CPU: kind 0 over the weight itself."""
        if self.bias is not None or not f32_cpu(self.weight):
            return None
        return NativeLinear(0, self.weight)


def native_form(layer: nn.Module) -> NativeLinear | None:
    """`layer.native_form()` for a layer implementing the protocol (a plain `nn.Linear` has none)."""
    get = getattr(layer, "native_form", None)
    return get() if callable(get) else None


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """`layer.dense_weight()`, or the weight of a plain `nn.Linear`."""
    get = getattr(layer, "dense_weight", None)
    return get() if callable(get) else layer.weight
