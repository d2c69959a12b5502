"""One class per storage format: in-memory tensors, matmul, dequantization, and the on-disk tensors.

A format turns a float weight [..., N, K] into a dict of tensors (leading dims = stacked experts),
multiplies by one such matrix, and converts to and from the checkpoint tensors of one matrix:

| format | checkpoint tensors (per linear `<name>`)                                              |
|--------|----------------------------------------------------------------------------------------|
| int8   | `weight` int8 [N, K], `weight_scale` fp32 [N]                                          |
| int4   | `weight_packed` uint8 [N, Kp/2], `weight_scale` fp32 [N, Kp/g], `weight_zero_point` uint8 [N, Kp/g] (g per matrix) |
| fp8    | `weight` float8_e4m3fn [N, K], `weight_scale_inv` fp32 [⌈N/128⌉, ⌈K/128⌉] (DeepSeek's layout) |
"""

from __future__ import annotations

import re

import torch
from torch import nn
import torch.nn.functional as F

from dsv3.quant import kernels as kn
from dsv3.quant.schemes import (INT4_GROUP_SIZES, QuantError, ceil_to, check_group_size, dequantize_fp8_block,
                                effective_group, pack_nibbles, quantize_fp8_block, quantize_int4, quantize_int8,
                                unpack_nibbles)

Tensors = dict[str, torch.Tensor]
_EXPERT_INDEX = re.compile(r"\.experts\.\d+\.")


def _expect(d: Tensors, name: str, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if key not in d:
        raise QuantError(f"tensor {name}.{key} is missing from the quantized checkpoint")
    t = d[key]
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise QuantError(f"tensor {name}.{key} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, "
                         f"expected {str(dtype).removeprefix('torch.')} {list(shape)}")
    return t


def _leading_loop(w: torch.Tensor, fn) -> Tensors:
    """Apply a per-matrix quantizer over the leading (expert) dims and stack the results."""
    if w.dim() == 2:
        return fn(w)
    parts = [fn(m) for m in w.reshape(-1, *w.shape[-2:])]
    return {k: torch.stack([p[k] for p in parts]).view(*w.shape[:-2], *parts[0][k].shape) for k in parts[0]}


class Int8Format:
    """Weight-only int8, one scale per output channel."""

    name, bits = "int8", 8
    ckpt_keys = ("weight", "weight_scale")

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def config(self) -> dict:
        return {"bits": 8, "granularity": "per_channel", "symmetric": True}

    def quantize(self, w: torch.Tensor, clip: torch.Tensor | None = None) -> Tensors:
        q, s = quantize_int8(w)
        return {"qweight": q.to(self.device), "scale": s.to(self.device)}

    def matmul(self, x: torch.Tensor, t: Tensors, out_features: int) -> torch.Tensor:
        return kn.int8_mm(x, t["qweight"], t["scale"])

    def dequant(self, t: Tensors, out_features: int, in_features: int) -> torch.Tensor:
        return t["qweight"].float() * t["scale"].float()[..., None]

    def export(self, t: Tensors, out_features: int, in_features: int) -> Tensors:
        return {"weight": t["qweight"].cpu(), "weight_scale": t["scale"].float().cpu()}

    def load(self, d: Tensors, out_features: int, in_features: int, name: str) -> Tensors:
        q = _expect(d, name, "weight", (out_features, in_features), torch.int8)
        s = _expect(d, name, "weight_scale", (out_features,), torch.float32)
        if not torch.isfinite(s).all() or (s <= 0).any():
            raise QuantError(f"tensor {name}.weight_scale has non-positive or non-finite entries")
        return {"qweight": q.clone().to(self.device), "scale": s.clone().to(self.device)}


class Int4Format:
    """Weight-only int4 in groups of input channels, with or without zero points.

    `group_size` is the requested group; each matrix uses `effective_group(K, group_size)`, so narrow
    inputs are not padded. A checkpoint lists every module whose group differs from `group_size` in
    `group_sizes` (checkpoint name, routed experts as `<prefix>.experts.*.<proj>`), and loading
    checks each tensor against the group recorded for it.
    """

    name, bits = "int4", 4
    ckpt_keys = ("weight_packed", "weight_scale", "weight_zero_point")

    def __init__(self, group_size: int = 128, zero_point: bool = True, device: torch.device | str = "cpu",
                 group_sizes: dict[str, int] | None = None):
        self.group_size = check_group_size(group_size)
        self.zero_point = zero_point
        self.device = torch.device(device)
        self.kernel = self.device.type == "cpu" and kn.has_cpu_kernels()
        self.group_sizes = {}
        for k, v in (group_sizes or {}).items():
            if not isinstance(v, int) or v not in INT4_GROUP_SIZES:
                raise QuantError(f"quantization_config.group_sizes[{k!r}] is {v!r}, not one of {', '.join(map(str, INT4_GROUP_SIZES))}")
            self.group_sizes[k] = v

    def config(self) -> dict:
        return {"bits": 4, "group_size": self.group_size, "zero_point": self.zero_point}

    def group_for(self, in_features: int) -> int:
        """The group a matrix with `in_features` inputs is quantized with."""
        return effective_group(in_features, self.group_size)

    def stored_group(self, name: str) -> int:
        """The group the checkpoint records for tensor prefix `name` (experts match `.experts.*.`)."""
        return self.group_sizes.get(name, self.group_sizes.get(_EXPERT_INDEX.sub(".experts.*.", name), self.group_size))

    @staticmethod
    def tensor_group(t: Tensors) -> int:
        """The group of packed tensors: Kp / number of groups."""
        return t["packed"].shape[-1] * 2 // t["scale_zeros"].shape[-3]

    def _pack(self, u: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> Tensors:
        rows = ceil_to(u.shape[0], kn.INT4_ROW_MULTIPLE)
        return {"packed": kn.int4_pack(u, self.kernel).to(self.device),
                "scale_zeros": kn.int4_scale_zeros(s, z, rows).to(self.device)}

    def quantize(self, w: torch.Tensor, clip: torch.Tensor | None = None) -> Tensors:
        g = self.group_for(w.shape[-1])

        def one(m: torch.Tensor, c: torch.Tensor | None = None) -> Tensors:
            return self._pack(*quantize_int4(m, g, self.zero_point, c))
        if clip is None or w.dim() == 2:
            return _leading_loop(w, one) if clip is None else one(w, clip)
        parts = [one(m, c) for m, c in zip(w, clip)]
        return {k: torch.stack([p[k] for p in parts]) for k in parts[0]}

    def matmul(self, x: torch.Tensor, t: Tensors, out_features: int) -> torch.Tensor:
        return kn.int4_mm(x, t["packed"], t["scale_zeros"], self.tensor_group(t), out_features, self.kernel)

    def dequant(self, t: Tensors, out_features: int, in_features: int) -> torch.Tensor:
        def one(p: torch.Tensor, scz: torch.Tensor) -> torch.Tensor:
            return kn.int4_dequant(p, scz, self.kernel)[:out_features, :in_features]
        p, scz = t["packed"], t["scale_zeros"]
        if p.dim() == 2:
            return one(p, scz)
        return torch.stack([one(a, b) for a, b in zip(p, scz)])

    def native(self, t: Tensors, out_features: int, in_features: int) -> tuple | None:
        """(blocks uint8 [..., N, K/2], scale [..., N, G], bias [..., N, G], group) in the layout of the native
        decode kernels (`dsv3.kernels`, kind 2), or None when the group is not a multiple of 32 or padded."""
        g = self.tensor_group(t)
        if g % 32 or in_features % g or t["packed"].shape[-1] * 2 != in_features:
            return None
        p, scz = t["packed"], t["scale_zeros"]
        one = lambda q: kn.int4_unpack(q, self.kernel)[:out_features]  # noqa: E731
        u = one(p) if p.dim() == 2 else torch.stack([one(q) for q in p])
        u = u.view(*u.shape[:-1], in_features // 32, 2, 16)
        blocks = (u[..., 0, :] | (u[..., 1, :] << 4)).flatten(-2).contiguous()
        scale = scz[..., 0].transpose(-1, -2)[..., :out_features, :].float()
        bias = scz[..., 1].transpose(-1, -2)[..., :out_features, :].float() - 8.0 * scale  # w = (u - 8)·s + zero'
        return blocks.cpu(), scale.contiguous().cpu(), bias.contiguous().cpu(), g

    def export(self, t: Tensors, out_features: int, in_features: int) -> Tensors:
        u = kn.int4_unpack(t["packed"], self.kernel)[:out_features].cpu()
        s, z = kn.split_scale_zeros(t["scale_zeros"].cpu(), out_features)
        return {"weight_packed": pack_nibbles(u), "weight_scale": s, "weight_zero_point": z}

    def load(self, d: Tensors, out_features: int, in_features: int, name: str) -> Tensors:
        g = self.stored_group(name)
        Kp = ceil_to(in_features, g)
        G = Kp // g
        p = _expect(d, name, "weight_packed", (out_features, Kp // 2), torch.uint8)
        s = _expect(d, name, "weight_scale", (out_features, G), torch.float32)
        z = _expect(d, name, "weight_zero_point", (out_features, G), torch.uint8)
        if not torch.isfinite(s).all() or (s < 0).any() or (z > 15).any():
            raise QuantError(f"tensor {name}.weight_scale or .weight_zero_point holds values outside the int4 format")
        return self._pack(unpack_nibbles(p), s, z)


class FP8Format:
    """FP8 e4m3 with fp32 128×128 block scales; kept in FP8, dequantized per block for the matmul."""

    name, bits = "fp8", 8
    ckpt_keys = ("weight", "weight_scale_inv")
    block = (128, 128)

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def config(self) -> dict:
        return {"activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": list(self.block)}

    def quantize(self, w: torch.Tensor, clip: torch.Tensor | None = None) -> Tensors:
        t = _leading_loop(w, lambda m: dict(zip(("qweight", "scale_inv"), quantize_fp8_block(m, self.block))))
        return {k: v.to(self.device) for k, v in t.items()}

    def matmul(self, x: torch.Tensor, t: Tensors, out_features: int) -> torch.Tensor:
        return F.linear(x, self.dequant(t, out_features, x.shape[-1]).to(x.dtype))

    def dequant(self, t: Tensors, out_features: int, in_features: int) -> torch.Tensor:
        return dequantize_fp8_block(t["qweight"], t["scale_inv"], self.block)

    def export(self, t: Tensors, out_features: int, in_features: int) -> Tensors:
        return {"weight": t["qweight"].cpu(), "weight_scale_inv": t["scale_inv"].float().cpu()}

    def load(self, d: Tensors, out_features: int, in_features: int, name: str) -> Tensors:
        grid = (-(-out_features // self.block[0]), -(-in_features // self.block[1]))
        q = _expect(d, name, "weight", (out_features, in_features), torch.float8_e4m3fn)
        s = _expect(d, name, "weight_scale_inv", grid, torch.float32)
        if not torch.isfinite(s).all():
            raise QuantError(f"tensor {name}.weight_scale_inv has non-finite entries")
        return {"qweight": q.clone().to(self.device), "scale_inv": s.clone().to(self.device)}


Format = Int8Format | Int4Format | FP8Format


def make_format(fmt: str, group_size: int = 128, zero_point: bool = True, device: torch.device | str = "cpu",
                group_sizes: dict[str, int] | None = None) -> Format:
    if fmt == "int8":
        return Int8Format(device)
    if fmt == "int4":
        return Int4Format(group_size, zero_point, device, group_sizes)
    if fmt == "fp8":
        return FP8Format(device)
    raise QuantError(f"unknown quantized format {fmt!r} (use int8, int4 or fp8)")


class PackedModule(nn.Module):
    """A module holding packed weights and, derived from them on first use, forms the kernels read (int4 in the
    native layout, a dense kv_b): those are dropped (`reset_native`) when the packed buffers are replaced."""

    _derived: tuple[str, ...] = ("_native4",)

    def _apply(self, fn, recurse: bool = True):
        """`.to()` and friends replace the packed buffers: what was derived from them goes too."""
        out = super()._apply(fn, recurse)
        self.reset_native()
        return out

    def reset_native(self) -> None:
        for name in self._derived:
            self.__dict__.pop(name, None)
