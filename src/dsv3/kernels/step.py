"""Python side of `step.c`: a decode step's blocks in one native call.

`run_blocks` turns a model's blocks into a plan of `LayerPlan` structs once (every projection as a
`dsv3.kernels.layers` descriptor, norms, router and cache pointers), then each step is one call.
The plan is checked every step in a few microseconds: any module or tensor registered anywhere
since it was built (a layer quantized, a LoRA wrapper, a new Parameter) or a weight that moved
(`.to()`) rebuilds it; a forward hook, a MoE recording its expert loads, or a block without a
native form (LoRA, FP8, bf16, softmax routing) keeps the per-module path, which gives the same
numbers.
"""

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
from dsv3.kernels import Lin
from dsv3.kernels.layers import describe, int4_desc
from dsv3.kernels.mla import MLADims, plan as mla_plan

_F, _P, _L = ctypes.c_float, ctypes.c_void_p, ctypes.c_long
ENABLED = True  # False: every module runs on its own (the per-module kernels still apply); tests compare the two


class LayerPlan(ctypes.Structure):
    """`LayerPlan` of step.c."""

    _fields_ = [("mla", MLADims), ("q_a", Lin), ("q_b", Lin), ("kv_a", Lin), ("o", Lin), ("q_norm", _P), ("kv_norm", _P),
                ("w_kvb", _P), ("in_norm", _P), ("post_norm", _P), ("eps", _F), ("gate", Lin), ("up", Lin),
                ("down", Lin), ("inter", _L), ("router", _P), ("router_bias", _P), ("E", _L), ("n_group", _L),
                ("topk_group", _L), ("top_k", _L), ("norm_topk", _L), ("route_scale", _F), ("egate", Lin),
                ("eup", Lin), ("edown", Lin), ("einter", _L)]


class ModelPlan(ctypes.Structure):
    """`ModelPlan` of step.c."""

    _fields_ = [("embed", _P), ("inv_freq", _P), ("attn_factor", _F), ("final_eps", _F), ("final_norm", _P),
                ("head", Lin), ("vocab", _L), ("half", _L)]


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
        self._scratch: dict[tuple, tuple[int, torch.Tensor]] = {}  # (thread, M) -> (keys it holds, buffer)

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
        key = ("hidden", threading.get_ident(), M)
        buf = self._scratch.get(key)
        if buf is None:
            buf = self._scratch[key] = (0, torch.empty(M, self.array[0].mla.D))
        return buf[1]

    def moved(self) -> bool:
        return list(map(torch.Tensor.data_ptr, map(dict.__getitem__, self.dicts, self.keys))) != self.ptrs  # C-level loops

    def blocked(self) -> bool:
        """A forward hook or expert-load recording wants the modules to run."""
        return (bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)
                or any(map(_hooks, self.modules)) or any(map(_pre_hooks, self.modules)) or any(map(_tracking, self.moes)))


def _experts(experts: nn.Module, keep: list) -> tuple[Lin, Lin, Lin, int] | None:
    """Routed experts as (gate, up, down) descriptors with expert strides, and their intermediate size."""
    from dsv3.model.moe import Experts

    if type(experts) is Experts:
        gu, down = experts.gate_up_proj, experts.down_proj
        if gu.dtype != torch.float32 or not (gu.is_contiguous() and down.is_contiguous() and gu.is_cpu):
            return None
        keep += [gu, down]
        inter, per = down.shape[-1], gu[0].numel() * 4
        return (Lin(gu.data_ptr(), None, None, 0, 0, per, 0),
                Lin(gu.data_ptr() + inter * gu.shape[-1] * 4, None, None, 0, 0, per, 0),
                Lin(down.data_ptr(), None, None, 0, 0, down[0].numel() * 4, 0), inter)
    fmt = getattr(getattr(experts, "fmt", None), "name", None)
    if fmt == "int8":
        pairs = [(getattr(experts, f"{p}_qweight"), getattr(experts, f"{p}_scale")) for p in ("gate_proj", "up_proj", "down_proj")]
        if not all(t.is_cpu and t.is_contiguous() for pair in pairs for t in pair):
            return None
        keep += [t for pair in pairs for t in pair]
        descs = [Lin(q.data_ptr(), s.data_ptr(), None, 1, 0, q[0].numel(), s[0].numel()) for q, s in pairs]
        return (*descs, pairs[2][0].shape[-1])
    if fmt == "int4":
        descs = experts.native_int4()
        if descs is None:
            return None
        keep += [t for part in experts.__dict__["_native4"] for t in part[:3]]
        return (*descs, experts.inter)
    return None


def _block(block: nn.Module, keep: list, modules: list) -> LayerPlan | None:
    from dsv3.model.moe import MoE

    attn, ffn = block.self_attn, block.mlp
    p = mla_plan(attn)
    if p is None:
        return None
    dims, q_a, q_b, kv_a, o, norms, w_kvb, kept = p
    keep += kept + norms + [w_kvb]
    in_norm, post_norm = block.input_layernorm, block.post_attention_layernorm
    if in_norm.eps != post_norm.eps or any(n.weight.dtype != torch.float32 or not n.weight.is_contiguous()
                                           for n in (in_norm, post_norm)):
        return None
    keep += [in_norm.weight, post_norm.weight]
    lp = LayerPlan(mla=dims, q_a=q_a, q_b=q_b, kv_a=kv_a, o=o, q_norm=norms[0].data_ptr() if dims.Rq else None,
                   kv_norm=norms[-1].data_ptr(), w_kvb=w_kvb.data_ptr(), in_norm=in_norm.weight.data_ptr(),
                   post_norm=post_norm.weight.data_ptr(), eps=in_norm.eps)
    mlp = ffn.shared_experts if isinstance(ffn, MoE) else ffn
    if mlp is not None:
        descs = [describe(getattr(mlp, n), keep) for n in ("gate_proj", "up_proj", "down_proj")]
        if None in descs:
            return None
        lp.gate, lp.up, lp.down = descs
        lp.inter = mlp.down_proj.in_features
    modules += [block, attn, ffn, in_norm, post_norm] + [m for m in attn.children()] + \
        ([m for m in mlp.children()] if mlp is not None else [])
    if isinstance(ffn, MoE):
        g = ffn.gate
        if not (g.scoring_func == "sigmoid" and g.topk_method == "noaux_tc" and g.n_experts <= kernels.MAX_EXPERTS
                and g.n_group <= kernels.MAX_GROUPS and g.weight.dtype == torch.float32 and g.weight.is_contiguous()):
            return None
        ex = _experts(ffn.experts, keep)
        if ex is None:
            return None
        bias = g.e_score_correction_bias
        keep += [g.weight] + ([bias] if bias is not None else [])
        lp.router, lp.router_bias = g.weight.data_ptr(), None if bias is None else bias.data_ptr()
        lp.E, lp.n_group, lp.topk_group, lp.top_k = g.n_experts, g.n_group, g.topk_group, g.top_k
        lp.norm_topk, lp.route_scale = int(g.norm_topk_prob), g.scaling
        lp.egate, lp.eup, lp.edown, lp.einter = ex
        modules += [g, ffn.experts]
    return lp


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
    layers = [_block(b, keep, modules) for b in blocks]
    moes = [b.mlp for b in blocks if hasattr(b.mlp, "track_load")]
    return None if None in layers else _Plan(blocks, layers, keep, modules, moes, **model)


def block_plan(owner: nn.Module, blocks: Sequence[nn.Module]) -> _Plan | None:
    """The plan of `blocks` (cached on `owner`), or None when one of them has no native form this step."""
    return _cached(owner, lambda: _build_blocks(blocks))


def _build_model(model: nn.Module) -> _Plan | None:
    m = model.model
    emb, norm, rot = m.embed_tokens.weight, m.norm.weight, m.rotary.inv_freq
    if any(t.dtype != torch.float32 or not t.is_contiguous() or not t.is_cpu for t in (emb, norm, rot)):
        return None
    keep: list = [emb, norm, rot]
    head = describe(model.lm_head, keep)
    mp = ModelPlan(embed=emb.data_ptr(), inv_freq=rot.data_ptr(), attn_factor=m.rotary.attn_factor, final_eps=m.norm.eps,
                   final_norm=norm.data_ptr(), head=head or Lin(), vocab=emb.shape[0], half=rot.numel())
    p = _build_blocks(m.layers, [m.embed_tokens, m.norm, m.rotary, model.lm_head], model=mp, head=head is not None)
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
              logits: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A decode step of the whole model in one native call, after `ctx.begin_step`: (post-norm hidden [B, T, D],
    logits [B, T, V] when asked and the head is native, else None), or None when the step has no native form.
    positions [B, T], or None for start + t."""
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
    hidden = torch.empty(B, T, model.config.hidden_size, dtype=torch.float32) if out is None else p.hidden(M)
    caches = (ctypes.c_void_p * len(layers))(*ctx.native_cache_ptrs(p.layer_ids))
    bad = kernels.library().decode_step(
        ctypes.byref(p.model), p.array, len(layers), caches, ids.data_ptr(), None if pos is None else pos.data_ptr(),
        start, T, M, slot_mapping, key_slots, key_mask, S, hidden.data_ptr(), None if out is None else out.data_ptr(),
        p.scratch(M, S), torch.get_num_threads())
    if bad:
        raise IndexError(f"token id {int(ids.reshape(-1)[bad - 1])} is out of range for the vocabulary of {p.model.vocab}")
    return hidden, out
