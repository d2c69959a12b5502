"""What `step.c` reads: a transformer block, or the parts of a model around its blocks, as C structs.

Each block becomes a `LayerPlan` (its MLA dims and projection descriptors, norms, and the dense MLP
or the router, routed-expert descriptors with expert strides and shared experts); the model adds a
`ModelPlan` (embedding, rotary frequencies, final norm, LM head). A block with any part that has no
native form (LoRA, FP8, bf16 weights, softmax routing) gives None, and the caller runs the modules.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from dsv3 import kernels
from dsv3.kernels import Lin
from dsv3.kernels.layers import describe
from dsv3.kernels.mla import MLADims, plan as mla_plan

_F, _P, _L = ctypes.c_float, ctypes.c_void_p, ctypes.c_long


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


def experts_descs(experts: nn.Module, keep: list) -> tuple[Lin, Lin, Lin, int] | None:
    """Routed experts as (gate, up, down) descriptors with expert strides, and their intermediate size."""
    from dsv3.layers.moe import Experts

    if type(experts) is Experts:
        gu, down = experts.gate_up_proj, experts.down_proj
        if gu.dtype != torch.float32 or not (gu.is_contiguous() and down.is_contiguous() and gu.is_cpu):
            return None
        keep += [gu, down]
        return (*kernels.f32_expert_descs(gu, down), down.shape[-1])
    fmt = getattr(getattr(experts, "fmt", None), "name", None)
    if fmt == "int8":
        pairs = [(getattr(experts, f"{p}_qweight"), getattr(experts, f"{p}_scale")) for p in ("gate_proj", "up_proj", "down_proj")]
        if not all(t.is_cpu and t.is_contiguous() for pair in pairs for t in pair):
            return None
        keep += [t for pair in pairs for t in pair]
        return (*kernels.int8_expert_descs(pairs), pairs[2][0].shape[-1])
    if fmt == "int4":  # the converted weights live on the module, which the plan holds
        descs = experts.native_int4()
        return None if descs is None else (*descs, experts.inter)
    return None


def layer_plan(block: nn.Module, keep: list, modules: list) -> LayerPlan | None:
    from dsv3.layers.moe import MoE

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
        ex = experts_descs(ffn.experts, keep)
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


def model_plan(model: nn.Module, keep: list) -> tuple[ModelPlan, bool] | None:
    """The parts around the blocks, and whether the LM head is native; None for a non-fp32 model."""
    m = model.model
    if type(m.embed_tokens) is not nn.Embedding:  # e.g. a vocab-parallel shard: its rows are not the token ids
        return None
    emb, norm, rot = m.embed_tokens.weight, m.norm.weight, m.rotary.inv_freq
    if any(t.dtype != torch.float32 or not t.is_contiguous() or not t.is_cpu for t in (emb, norm, rot)):
        return None
    keep += [emb, norm, rot]
    head = describe(model.lm_head, keep)
    mp = ModelPlan(embed=emb.data_ptr(), inv_freq=rot.data_ptr(), attn_factor=m.rotary.attn_factor, final_eps=m.norm.eps,
                   final_norm=norm.data_ptr(), head=head or Lin(), vocab=emb.shape[0], half=rot.numel())
    return mp, head is not None
