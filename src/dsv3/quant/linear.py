"""`QuantLinear`: a drop-in `nn.Linear` (no bias) whose weight lives in a packed format.

It stores only the packed tensors as buffers, so `model.state_dict()` sizes and byte counts are
the real ones. `dense_weight()` is what absorbed MLA reads for `kv_b_proj`; it is cached because
decode calls it every step and unpacking int4 from the kernel layout is not free.

The packed kernels have no autograd formula, so a frozen QuantLinear gets its own backward (QLoRA
trains adapters through it): dX = dY · dequant(W), with W dequantized on the fly and dropped again,
so only the packed weights stay resident. Unpacking int4 from the kernel's blocked layout uses a
nibble order computed once per matrix shape (probing the layout per call costs ~0.5 s a matrix).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3 import ops
from dsv3.ops.forms import NativeLinear
from dsv3.quant import kernels as kn
from dsv3.quant.formats import Format, PackedModule, Tensors

_INT4_ORDER: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _int4_order(Np: int, Kp: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(byte index, bit shift) in the kernel's blocked layout of each row-major value of an [Np, Kp] int4
    matrix; computed once per shape (9 bytes a value, for one matrix of each shape, not for each matrix)."""
    key = (Np, Kp, str(device))
    if key not in _INT4_ORDER:
        src = kn._kernel_source_index(Np, Kp)  # kernel nibble i holds plain value src[i]
        inv = torch.empty_like(src)
        inv[src] = torch.arange(src.numel())
        _INT4_ORDER[key] = ((inv >> 1).to(device), ((inv & 1) << 2).to(torch.uint8).to(device))
    return _INT4_ORDER[key]


def dequant(fmt: Format, t: Tensors, out_features: int, in_features: int) -> torch.Tensor:
    """`fmt.dequant` (fp32 [..., out, in]), vectorised over stacked experts for int4 in the CPU kernel layout.

    int4: w = u·s + (zero' − 8·s) per group, as `kernels.int4_dequant`, with u gathered straight from the
    packed bytes through the cached nibble order (no per-call layout probing, no per-matrix loop).
    """
    if fmt.name != "int4" or not fmt.kernel:
        return fmt.dequant(t, out_features, in_features)
    p, scz = t["packed"], t["scale_zeros"]  # [..., Np, Kp/2], [..., G, Np, 2]
    Np, Kp, G = p.shape[-2], p.shape[-1] * 2, scz.shape[-3]
    byte, shift = _int4_order(Np, Kp, p.device)
    u = (p.reshape(*p.shape[:-2], -1)[..., byte] >> shift) & 15
    s, zf = scz[..., 0].transpose(-1, -2).float(), scz[..., 1].transpose(-1, -2).float()  # [..., Np, G]
    w = torch.addcmul((zf - 8.0 * s)[..., None], u.view(*p.shape[:-2], Np, G, Kp // G).float(), s[..., None])
    return w.flatten(-2)[..., :out_features, :in_features]


class _PackedMatmul(torch.autograd.Function):
    """x·Wᵀ through the packed kernel with W frozen: the backward is dX = dY·W only (no dW)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantLinear") -> torch.Tensor:
        ctx.layer = layer
        return layer.fmt.matmul(x, layer.tensors, layer.out_features)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.grad_weight().to(grad.dtype), None


class QuantLinear(PackedModule):
    """y = x Wᵀ with W held as `fmt` tensors; activations keep their dtype (weight-only quantization).
    Implements `dsv3.layers.linear.LinearMethod` (`dense_weight`, `native_form`)."""

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
        x2 = x.reshape(-1, shape[-1])
        if torch.is_grad_enabled() and x.requires_grad:
            y = _PackedMatmul.apply(x2, self)
        else:
            y = ops.linear(x2, self.native_form()) if self.fmt.name in ("int8", "int4") and ops.native(x2) else None
            if y is None:  # (decode takes the native kernel: int8 rows, or int4 in the native layout)
                y = self.fmt.matmul(x2, self.tensors, self.out_features)
        return y.view(*shape[:-1], self.out_features)

    def grad_weight(self) -> torch.Tensor:
        """fp32 W [out, in] for the backward pass: the decode cache if filled, else dequantized and not kept."""
        if self._dense is not None:
            return self._dense
        return dequant(self.fmt, self.tensors, self.out_features, self.in_features)

    def dense_weight(self) -> torch.Tensor:
        """The dequantized weight [out, in] (cached), in the module's activation dtype."""
        if self._dense is None:
            self._dense = self.fmt.dequant(self.tensors, self.out_features, self.in_features).to(self.act_dtype)
        return self._dense

    def native_form(self) -> NativeLinear | None:
        """int8: the stored rows and scales (kind 1); int4: weights converted on first use to the native kernels'
        block layout (kind 2; the CPU int4 kernel's layout cannot be read by them), kept beside the packed ones
        until `reset_native`; None for FP8 or off the CPU."""
        if self.fmt.name == "int8" and self.qweight.is_cpu:
            return NativeLinear(1, self.qweight, self.scale)
        if self.fmt.name != "int4" or not self.packed.is_cpu:
            return None
        if "_native4" not in self.__dict__:
            self.__dict__["_native4"] = self.fmt.native(self.tensors, self.out_features, self.in_features)
        t = self.__dict__["_native4"]
        return None if t is None else NativeLinear(2, t[0], t[1], t[2], t[3])

    def reset_native(self) -> None:
        """Drop what was derived from the packed weights (the native int4 layout, the dense kv_b weight)."""
        super().reset_native()
        self._dense = None

    def export(self) -> Tensors:
        return self.fmt.export(self.tensors, self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.name}"
