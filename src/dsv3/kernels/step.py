"""Python side of `step.c`: a decode step of the whole model, or of some blocks, in one native call.

`run_model` (the model's decode steps) and `run_blocks` (the MTP module's block) build a plan once
(`dsv3.kernels.plan`: C structs of descriptors, norms, router and experts), then each step is one
call. The plan is checked every step in a few microseconds: any module or tensor registered
anywhere since it was built (a layer quantized, a LoRA wrapper, a new Parameter) or a weight that
moved (`.to()`) rebuilds it; a forward hook, a MoE recording its expert loads, or a block without
a native form (LoRA, FP8, bf16, softmax routing) keeps the per-module path, which gives the same
numbers."""

from __future__ import annotations

import ctypes
import itertools
import operator
import threading
import weakref
from typing import Sequence

import torch
from torch import nn
from torch.nn.modules import module as nn_module

from dsv3 import kernels
from dsv3.kernels.plan import LayerPlan, ModelPlan, layer_plan, model_plan

ENABLED = True  # False: every module runs on its own (the per-module kernels still apply); tests compare the two


_generation = itertools.count(1)
_current = [0]


def _registered(*_args) -> None:
    """Any module, parameter or buffer registered anywhere: plans built before may point at old weights."""
    _current[0] = next(_generation)


for _hook in (nn_module.register_module_module_registration_hook, nn_module.register_module_parameter_registration_hook,
              nn_module.register_module_buffer_registration_hook):
    _hook(_registered)


_hooks, _pre_hooks, _tracking = (operator.attrgetter(a) for a in ("_forward_hooks", "_forward_pre_hooks", "track_load"))


class _Plan:
    """The LayerPlan array of some blocks, the tensors it points into, and what must not change under it."""

    def __init__(self, blocks: Sequence[nn.Module], layers: list[LayerPlan], keep: list, modules: list[nn.Module],
                 moes: list[nn.Module], model: ModelPlan | None = None, head: bool = False):
        self.array = (LayerPlan * len(layers))(*layers)
        self.model, self.head = model, head  # whole-model plans: embedding, rotary, final norm, and the head if native
        self.keep = keep
        self.modules = modules  # checked for forward hooks each step
        self.moes = moes        # checked for track_load
        # (tensor dict, key, data_ptr) of each module's first tensor: `.to()` replaces them without a registration
        firsts = [(d, k, t.data_ptr()) for m in modules for d in (m._parameters, m._buffers)
                  for k, t in itertools.islice(((k, t) for k, t in d.items() if t is not None), 1)]
        self.dicts, self.keys, self.ptrs = (list(c) for c in zip(*firsts)) if firsts else ([], [], [])
        self.layer_ids = [b.self_attn.layer_idx for b in blocks]
        self._scratch: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}  # (thread, M) -> (keys it holds, buffer)
        self._hidden: dict[tuple[int, int], torch.Tensor] = {}  # (thread, M) -> [M, D]

    def scratch(self, M: int, S: int) -> int:
        """Address of a scratch buffer for M tokens and S keys, reused across steps (per thread), grown by doubling."""
        key = (threading.get_ident(), M)
        have = self._scratch.get(key)
        if have is None or have[0] < S:
            cap, lib, n = max(256, 2 * S), kernels.library(), len(self.layer_ids)
            size = (lib.decode_layers_scratch(self.array, n, M, cap) if self.model is None
                    else lib.decode_step_scratch(ctypes.byref(self.model), self.array, n, M, cap))
            have = self._scratch[key] = (cap, torch.empty(size, dtype=torch.float32))
        return have[1].data_ptr()

    def hidden(self, M: int) -> torch.Tensor:
        """A reused [M, D] buffer for hidden states nobody asked for (the step returns logits)."""
        key = (threading.get_ident(), M)
        if key not in self._hidden:
            self._hidden[key] = torch.empty(M, self.array[0].mla.D)
        return self._hidden[key]

    def moved(self) -> bool:
        return list(map(torch.Tensor.data_ptr, map(dict.__getitem__, self.dicts, self.keys))) != self.ptrs  # C-level loops

    def blocked(self) -> bool:
        """A forward hook or expert-load recording wants the modules to run."""
        return (bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)
                or any(map(_hooks, self.modules)) or any(map(_pre_hooks, self.modules)) or any(map(_tracking, self.moes)))


_PLANS: "weakref.WeakKeyDictionary[nn.Module, tuple[int, _Plan | None]]" = weakref.WeakKeyDictionary()


def _cached(owner: nn.Module, build) -> _Plan | None:
    entry = _PLANS.get(owner)
    if entry is None or entry[0] != _current[0] or (entry[1] is not None and entry[1].moved()):
        entry = _PLANS[owner] = (_current[0], build())
    p = entry[1]
    return None if p is None or p.blocked() else p


def _build_blocks(blocks: Sequence[nn.Module], extra: list[nn.Module] = (), **model) -> _Plan | None:
    keep: list = []
    modules: list = list(extra)
    layers = [layer_plan(b, keep, modules) for b in blocks]
    moes = [b.mlp for b in blocks if hasattr(b.mlp, "track_load")]
    return None if None in layers else _Plan(blocks, layers, keep, modules, moes, **model)


def block_plan(owner: nn.Module, blocks: Sequence[nn.Module]) -> _Plan | None:
    """The plan of `blocks` (cached on `owner`), or None when one of them has no native form this step."""
    return _cached(owner, lambda: _build_blocks(blocks))


def _build_model(model: nn.Module) -> _Plan | None:
    keep: list = []
    parts = model_plan(model, keep)
    if parts is None:
        return None
    m = model.model
    p = _build_blocks(m.layers, [m.embed_tokens, m.norm, m.rotary, model.lm_head], model=parts[0], head=parts[1])
    if p is not None:
        p.keep += keep
    return p


def run_blocks(owner: nn.Module, blocks: Sequence[nn.Module], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               ctx) -> torch.Tensor | None:
    """x [B, T, D] through `blocks` (residual stream, no final norm) in one native call, or None when the
    step or a block has no native form (the caller runs the modules). The MTP module's block runs here."""
    B, T, D = x.shape
    if not ENABLED or B * T > kernels.MAX_ROWS or not blocks or not kernels.usable(x):
        return None
    k0 = ctx.native_keys(blocks[0].self_attn.layer_idx)
    p = None if k0 is None else block_plan(owner, blocks)
    if p is None:
        return None
    M, S = B * T, k0.key_slots.shape[1]
    caches = (ctypes.c_void_p * len(blocks))(*ctx.native_cache_ptrs(p.layer_ids))
    y = x.reshape(M, D).clone()
    c, s = cos.reshape(M, -1).contiguous(), sin.reshape(M, -1).contiguous()
    kernels.library().decode_layers(
        p.array, len(blocks), caches, y.data_ptr(), M, c.data_ptr(), s.data_ptr(), k0.slot_mapping.data_ptr(),
        k0.key_slots.data_ptr(), None if k0.key_mask is None else k0.key_mask.data_ptr(), S, p.scratch(M, S),
        torch.get_num_threads())
    return y.view(B, T, D)


def run_model(model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor | None, start: int, ctx,
              logits: bool, fresh_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A decode step of the whole model in one native call, after `ctx.begin_step`: (post-norm hidden [B, T, D],
    logits [B, T, V] when asked and the head is native, else None), or None when the step has no native form.
    positions [B, T], or None for start + t. With logits, the hidden states land in a buffer the next step
    reuses unless `fresh_hidden` (the engine keeps them for the MTP module)."""
    B, T = input_ids.shape
    M = B * T
    if not ENABLED or M > kernels.MAX_ROWS or not input_ids.is_cpu or not kernels.enabled():
        return None
    layers = model.model.layers
    slots = ctx.native_slots(layers[0].self_attn.layer_idx) if len(layers) else None
    p = None if slots is None else _cached(model, lambda: _build_model(model))
    if p is None:
        return None
    slot_mapping, key_slots, key_mask, S = slots
    ids = input_ids if input_ids.dtype == torch.int64 and input_ids.is_contiguous() else input_ids.to(torch.int64).contiguous()
    pos = None if positions is None else positions.to(torch.int64).contiguous()
    out = torch.empty(B, T, p.model.vocab, dtype=torch.float32) if logits and p.head else None
    hidden = (torch.empty(B, T, model.config.hidden_size, dtype=torch.float32) if out is None or fresh_hidden
              else p.hidden(M))
    caches = (ctypes.c_void_p * len(layers))(*ctx.native_cache_ptrs(p.layer_ids))
    bad = kernels.library().decode_step(
        ctypes.byref(p.model), p.array, len(layers), caches, ids.data_ptr(), None if pos is None else pos.data_ptr(),
        start, T, M, slot_mapping, key_slots, key_mask, S, hidden.data_ptr(), None if out is None else out.data_ptr(),
        p.scratch(M, S), torch.get_num_threads())
    if bad:
        raise IndexError(f"token id {int(ids.reshape(-1)[bad - 1])} is out of range for the vocabulary of {p.model.vocab}")
    return hidden, out
