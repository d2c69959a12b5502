"""Linear layers as the native kernels read them, and the dense SwiGLU MLP in one call.

A projection is passed to C as a descriptor (pointers, kind): an fp32 `nn.Linear`, or a quantized
layer exposing `native_int8()` or `native_int4()`. Anything else (LoRA wrappers, FP8, bf16
weights) has no descriptor and the caller keeps the PyTorch path. A module's
descriptors are built once and rebuilt when one of its weights is replaced.
"""

from __future__ import annotations

import ctypes
import weakref
from typing import Callable

import torch
from torch import nn

from dsv3 import kernels
from dsv3.kernels import Lin


def int4_desc(packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, group: int) -> Lin:
    """An int4 descriptor (`native_int4()` tensors); stacked experts [E, ...] get their strides."""
    stacked = packed.dim() == 3
    return Lin(packed.data_ptr(), scale.data_ptr(), bias.data_ptr(), 2, group,
               packed[0].numel() if stacked else 0, scale[0].numel() if stacked else 0)


def describe(layer: nn.Module, keep: list) -> Lin | None:
    """The descriptor of `layer` (its tensors appended to `keep`), or None when it has no native form."""
    if type(layer) is nn.Linear:
        w = layer.weight
        if layer.bias is not None or w.dtype != torch.float32 or not w.is_cpu or not w.is_contiguous():
            return None
        keep.append(w)
        return Lin(w.data_ptr(), None, None, 0)
    for kind, get in ((1, "native_int8"), (2, "native_int4")):
        tensors = getattr(layer, get, lambda: None)()
        if tensors is None:
            continue
        if not all(t.is_cpu and t.is_contiguous() for t in tensors[:3]):
            return None
        keep += list(tensors[:3])
        return Lin(tensors[0].data_ptr(), tensors[1].data_ptr(), None, 1) if kind == 1 else int4_desc(*tensors)
    return None


_PLANS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()  # off the module: deepcopy-safe


def _fingerprint(m: nn.Module) -> tuple:
    """The module and where its first tensor lives: changes when the module or its weight is replaced
    (`.to()`, a new `nn.Parameter`), not when values are copied in place (the pointers stay valid)."""
    for d in (m._parameters, m._buffers):
        for t in d.values():
            if t is not None:
                return id(m), t.data_ptr()
    return (id(m),)


def cached_plan(module: nn.Module, children: tuple[str, ...], build: Callable[[], tuple | None]) -> tuple | None:
    """`build()`'s result, cached for `module` until one of `children` or its weight is replaced."""
    mods = module._modules
    key = tuple(_fingerprint(c) for c in (mods.get(n) for n in children) if c is not None)
    cached = _PLANS.get(module)
    if cached is None or cached[0] != key:
        cached = _PLANS[module] = (key, build())
    return cached[1]


_MLP = ("gate_proj", "up_proj", "down_proj")


def mlp_decode(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """down(silu(gate x) ⊙ up x) for a few fp32 rows, or None when a projection has no native form."""
    def build():
        keep: list = []
        descs = [describe(getattr(mlp, n), keep) for n in _MLP]
        return None if None in descs else (descs, keep)

    p = cached_plan(mlp, _MLP, build)
    if p is None:
        return None
    (gate, up, down), _ = p
    D, I = x.shape[-1], mlp.down_proj.in_features
    xc = x.reshape(-1, D).contiguous()
    h, y = xc.new_empty(xc.shape[0], I), xc.new_empty(xc.shape[0], D)
    kernels.library().mlp_decode(ctypes.byref(gate), ctypes.byref(up), ctypes.byref(down), xc.data_ptr(), h.data_ptr(),
                                 y.data_ptr(), xc.shape[0], D, I, torch.get_num_threads())
    return y.view(x.shape)
