"""`QuantLinear`: a drop-in `nn.Linear` (no bias) whose weight lives in a packed format.

It stores only the packed tensors as buffers, so `model.state_dict()` sizes and byte counts are
the real ones. `dense_weight()` is what absorbed MLA reads for `kv_b_proj`; it is cached because
decode calls it every step and unpacking int4 from the kernel layout is not free.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3.quant.formats import Format, Tensors


class QuantLinear(nn.Module):
    """y = x Wᵀ with W held as `fmt` tensors; activations keep their dtype (weight-only quantization)."""

    def __init__(self, fmt: Format, in_features: int, out_features: int, tensors: Tensors,
                 act_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.fmt, self.in_features, self.out_features = fmt, in_features, out_features
        self.act_dtype = act_dtype
        self._keys = list(tensors)
        for k, v in tensors.items():
            self.register_buffer(k, v)
        self._dense: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: Format, clip: torch.Tensor | None = None) -> "QuantLinear":
        if linear.bias is not None:
            raise NotImplementedError("QuantLinear has no bias: DeepSeek-V3 linears have none")
        w = linear.weight.detach()
        return cls(fmt, w.shape[1], w.shape[0], fmt.quantize(w, clip), act_dtype=w.dtype)

    @property
    def tensors(self) -> Tensors:
        return {k: getattr(self, k) for k in self._keys}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.fmt.matmul(x.reshape(-1, shape[-1]), self.tensors, self.out_features)
        return y.view(*shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The dequantized weight [out, in] (cached), in the module's activation dtype."""
        if self._dense is None:
            self._dense = self.fmt.dequant(self.tensors, self.out_features, self.in_features).to(self.act_dtype)
        return self._dense

    def export(self) -> Tensors:
        return self.fmt.export(self.tensors, self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.name}"
