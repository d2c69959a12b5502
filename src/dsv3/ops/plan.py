"""Decode plans: a model's (or some blocks') native forms packed once into the arguments of
`dsv3::decode_step` / `dsv3::decode_layers` (see `dsv3.ops.layout`).

A plan holds tensors, not addresses: the op reads each tensor where it lives at the call, so a
weight whose storage is swapped (`.data = ...`, `cast`) is read at its new place. What a plan cannot
see is a module or parameter *replaced* by another object; the operations that do that
(quantizing, LoRA, merging adapters, parallelizing, `Module._apply` / `.to()`) call `changed()`
(through `dsv3.ops.invalidate`), which makes every plan built before it stale, and the next step
builds a new one.
A plan also steps aside, for that step, when an observer needs the modules to run: a forward hook on
one of them, or a MoE recording its expert loads.
"""

from __future__ import annotations

import operator
import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules import module as nn_module

from dsv3.ops.forms import NativeBlock, NativeLinear, NativeModel, NativeMTP
from dsv3.ops.layout import LAYER_FLOATS, LAYER_INTS, LAYER_WEIGHTS, MODEL_WEIGHTS

_EMPTY = [None, None, None]


def _lin(lin: NativeLinear | None) -> tuple[list, list[int]]:
    return (_EMPTY, [0, 0]) if lin is None else ([lin.weight, lin.scale, lin.bias], [lin.kind, lin.group])


def pack_block(b: NativeBlock) -> tuple[list, list[int], list[float]]:
    """One block's LAYER_WEIGHTS tensors, LAYER_INTS ints and LAYER_FLOATS floats."""
    a = b.mla
    weights: list = []
    ints: list[int] = list(a.dims)
    for lin in (a.q_a, a.q_b, a.kv_a, a.o):
        w, m = _lin(lin)
        weights += w
        ints += m
    weights += [a.q_norm, a.kv_norm, a.w_kvb, b.in_norm, b.post_norm]
    mlp = b.mlp or (None, None, None)
    inter = mlp[0].out_features if b.mlp else 0
    r = b.router
    ints += [inter, r.weight.shape[0] if r else 0, r.n_group if r else 0, r.topk_group if r else 0, r.top_k if r else 0,
             int(r.norm) if r else 0]
    for lin in mlp:
        w, m = _lin(lin)
        weights += w
        ints += m
    weights += [r.weight if r else None, r.bias if r else None]
    ex = b.experts
    for lin in (ex.gate, ex.up, ex.down) if ex else (None, None, None):
        w, m = _lin(lin)
        weights += w
        ints += m
    weights += [None] * len(PACKABLE)  # their packed copies: made by `Plan.pack_batched` when a batched step needs them
    floats = [*a.fdims, b.eps, r.scale if r else 0.0]
    assert (len(weights), len(ints), len(floats)) == (LAYER_WEIGHTS, LAYER_INTS, LAYER_FLOATS)
    return weights, ints, floats


# The fp32 projections a batched step (batch.c) multiplies by a packed copy when the BLAS has packed GEMMs: their
# weight's index in a layer's LAYER_WEIGHTS (q_a q_b kv_a o, then the dense MLP's or shared experts' gate up down);
# the copies follow at _PACKED0 + j.
PACKABLE = (0, 3, 6, 9, 17, 20, 23)
_PACKED0 = LAYER_WEIGHTS - len(PACKABLE)

_TRACKING = operator.attrgetter("track_load")


@dataclass
class Plan:
    """Packed op arguments, and the modules whose observers make a step take the per-module path."""

    weights: list
    meta: torch.Tensor
    fmeta: torch.Tensor
    layers: list[int]
    modules: list[nn.Module]
    moes: list[nn.Module]
    vocab: int = 0
    head: bool = False
    hidden_size: int = 0
    layer_base: int | None = None  # where the layers' weights start, for a plan whose steps may be batched
    _hidden: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # every module's hook dicts, gathered once: PyTorch adds and removes hooks in these dicts in place, so a
        # step checks them all in ~1 µs (a pass over the modules' attributes took ~9 µs, 1.5 % of a step)
        self._hook_dicts = [d for m in self.modules for d in (m._forward_hooks, m._forward_pre_hooks)]
        # every weight fp32: a step of more than MAX_ROWS rows runs batch.c's GEMM form (int8/int4 plans do not)
        self.batched = all(w.dtype == torch.float32 for w in self.weights if isinstance(w, torch.Tensor))
        self._packed: dict[int, tuple] = {}  # slot of a packed copy -> (its source tensor, data_ptr, version)
        self._screen: tuple | None = None  # (the head's `_key`, bf16 copy, largest row norm): `screen_head`

    def observed(self) -> bool:
        """A forward hook, or a MoE recording expert loads, wants the modules to run this step."""
        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return True
        return any(self._hook_dicts) or any(map(_TRACKING, self.moes))

    def pack_batched(self, head: bool) -> None:
        """Give a batched step packed copies (`dsv3::pack_linear`) of the fp32 projections, and of the head when
        `head`: MKL's packed GEMM skips the re-packing of every weight that each plain call does (its copies were
        8 % of a 64-row step; packed, the bench model's projections ran 20-30 % faster). Made on the first such step,
        so a batch-1 server never holds them, and re-made for a weight changed in place or given new storage since.
        Each copy is about its weight's bytes resident: MKL reserves a larger buffer (~8 MB for a 160 x 512 weight)
        but writes only the panels it fills. A BLAS without packed GEMMs gives no bytes: the steps multiply the
        weights as stored."""
        slots: list[tuple[int, int]] = [(3, MODEL_WEIGHTS - 1)] if head and self.head else []
        if self.layer_base is not None:
            for base in range(self.layer_base, len(self.weights), LAYER_WEIGHTS):
                slots += [(base + i, base + _PACKED0 + j) for j, i in enumerate(PACKABLE)]
        for src, dst in slots:
            w = self.weights[src]
            if not isinstance(w, torch.Tensor) or w.dtype != torch.float32:
                continue
            if _stale(self._packed.get(dst), w):
                self.weights[dst] = torch.ops.dsv3.pack_linear(w.detach())
                self._packed[dst] = _key(w)

    def screen_head(self) -> tuple[torch.Tensor, float] | None:
        """(a bf16 copy of the fp32 head, the largest norm of its rows) for `dsv3::screened_greedy`, or None when the
        head is not a plain fp32 matrix. Made on first use, so only an engine that decodes batches greedily holds it (half the
        head's bytes), and re-made for a head changed in place or given new storage since."""
        w = self.weights[3] if self.head else None
        if (not isinstance(w, torch.Tensor) or w.dtype != torch.float32 or self.weights[4] is not None
                or self.weights[5] is not None):  # a quantized head (scale) or one with a bias
            return None
        if self._screen is None or _stale(self._screen[0], w):
            d = w.detach()
            self._screen = (_key(w), d.to(torch.bfloat16).contiguous(), float(d.norm(dim=1).max()))
        return self._screen[1], self._screen[2]

    def hidden(self, M: int) -> torch.Tensor:
        """A reused [M, D] buffer (per thread) for hidden states nobody keeps (the step returns logits)."""
        key = (threading.get_ident(), M)
        if key not in self._hidden:
            self._hidden[key] = torch.empty(M, self.hidden_size)
        return self._hidden[key]


def _key(w: torch.Tensor) -> tuple:
    """What a copy made of `w` was made from: the tensor, its storage and its in-place version."""
    return w, w.data_ptr(), _version(w)


def _stale(key: tuple | None, w: torch.Tensor) -> bool:
    """A copy made from `key` no longer stands for `w`: none yet, another tensor, new storage or changed in place."""
    return key is None or key[0] is not w or key[1:] != _key(w)[1:]


def _version(t: torch.Tensor) -> int:
    """The tensor's in-place version counter; -1 for an inference tensor, which has none (its storage is checked)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _pack(blocks: list[NativeBlock], head: list | None = None, head_ints: list[int] | None = None,
          head_floats: list[float] | None = None) -> tuple[list, torch.Tensor, torch.Tensor]:
    weights, ints, floats = list(head or []), list(head_ints or []), list(head_floats or [])
    for b in blocks:
        w, i, f = pack_block(b)
        weights += w
        ints += i
        floats += f
    return weights, torch.tensor(ints, dtype=torch.int64), torch.tensor(floats, dtype=torch.float64)


_PLANS: "weakref.WeakKeyDictionary[nn.Module, tuple[int, Plan | None]]" = weakref.WeakKeyDictionary()
_epoch = [0]


def changed() -> None:
    """Some model's modules or parameters were replaced: plans built before now are stale (cheap: a counter)."""
    _epoch[0] += 1


def _fresh(owner: nn.Module) -> bool:
    entry = _PLANS.get(owner)
    return entry is not None and entry[0] == _epoch[0]


def model_plan(model: nn.Module) -> Plan | None:
    """The whole-model plan of `model` (built on first use from `model.native_model()`), or None when a part of it
    has no native form."""
    if not _fresh(model):
        form: NativeModel | None = model.native_model()
        if form is None:
            _PLANS[model] = (_epoch[0], None)
        else:
            head = form.head
            hw, hm = _lin(head)
            weights, meta, fmeta = _pack(form.blocks, [form.embed, form.inv_freq, form.final_norm, *hw, None],
                                         [*hm, form.embed.shape[0], form.inv_freq.numel()],
                                         [form.attn_factor, form.final_eps])
            _PLANS[model] = (_epoch[0], Plan(weights, meta, fmeta, list(form.layer_ids), list(model.modules()), _moes(model),
                                             vocab=form.embed.shape[0], head=head is not None, hidden_size=form.embed.shape[1],
                                             layer_base=MODEL_WEIGHTS))
    return _PLANS[model][1]


def blocks_plan(owner: nn.Module, blocks: list[nn.Module]) -> Plan | None:
    """The plan of some blocks (the MTP module's), cached on `owner`; None when one has no native form."""
    if not _fresh(owner):
        forms = [b.native_form() for b in blocks]
        if any(f is None for f in forms):
            _PLANS[owner] = (_epoch[0], None)
        else:
            weights, meta, fmeta = _pack(forms)
            mods = [m for b in blocks for m in b.modules()]
            _PLANS[owner] = (_epoch[0], Plan(weights, meta, fmeta, [b.layer_idx for b in blocks], mods, _moes(*blocks),
                                             hidden_size=forms[0].in_norm.numel()))
    return _PLANS[owner][1]


_MTP_PLANS: "weakref.WeakKeyDictionary[nn.Module, tuple[int, Plan | None]]" = weakref.WeakKeyDictionary()


def int8_rows(lin: NativeLinear) -> NativeLinear:
    """An fp32 linear as int8 with one scale per row (symmetric, round to nearest); other kinds as they are."""
    if lin.kind != 0:
        return lin
    w = lin.weight.detach().float()
    amax = w.abs().amax(-1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return NativeLinear(1, torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous(),
                        scale.contiguous())


def mtp_plan(model: nn.Module) -> Plan | None:
    """The MTP drafter plan of `model` (`model.native_mtp()`: MTP module 0 with its draft head), or None.

    An fp32 draft head is packed as an int8 copy (a quarter of its bytes, re-made with every new plan): a draft is
    only an argmax, and the main model verifies each one in fp32, so the output is exact whatever the copy rounds.
    """
    entry = _MTP_PLANS.get(model)
    if entry is None or entry[0] != _epoch[0]:
        get = getattr(model, "native_mtp", None)
        form: NativeMTP | None = get() if callable(get) else None
        plan = None
        if form is not None:
            ew, em = _lin(form.eh)
            hw, hm = _lin(int8_rows(form.head))
            weights, meta, fmeta = _pack([form.block], [form.enorm, form.hnorm, *ew, form.final_norm, *hw, form.draft_ids],
                                         [*em, *hm], [form.e_eps, form.h_eps, form.final_eps])
            mtp = model.model.mtp  # every module a hook on which must send the step through the modules
            plan = Plan(weights, meta, fmeta, [form.layer_id], list(mtp.modules()), _moes(mtp),
                        vocab=form.head.weight.shape[0], head=True, hidden_size=form.enorm.numel())
        _MTP_PLANS[model] = entry = (_epoch[0], plan)
    return entry[1]


def _moes(*roots: nn.Module) -> list[nn.Module]:
    return [m for r in roots for m in r.modules() if hasattr(m, "track_load")]


