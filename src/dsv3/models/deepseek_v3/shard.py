"""DeepSeek-V3's tensor/expert-parallel layout, applied to one model by swapping modules in place.

The model code is not forked: after `parallelize`, attention is the same `MLA` with `n_heads` set
to the local head count and `q_b_proj`/`q_proj`/`kv_b_proj` holding this rank's heads (the absorbed
form reads `kv_b_proj` as [n_heads, dn+dv, r], so it works unchanged), `o_proj` row-parallel;
the latent down-projections, their norms and the router stay replicated. Routed experts are the
same MoE layer holding a range of the experts (EP) or a slice of each (TP). `dsv3.parallel.shard`
then tells the loader which slice of a checkpoint tensor each rank needs.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3 import ops
from dsv3.layers.mla import MLA
from dsv3.layers.mlp import MLP
from dsv3.layers.moe import Experts, MoE
from dsv3.parallel.dist import ParallelConfig, all_reduce
from dsv3.parallel.layers import (ColumnParallelLinear, ParallelHead, RowParallelLinear, Shard,
                                  VocabParallelEmbedding, split)


def _column(lin: nn.Linear, pc: ParallelConfig, what: str) -> ColumnParallelLinear:
    return ColumnParallelLinear(lin.in_features, lin.out_features, pc.tp, pc.tp_rank, what)


def _row(lin: nn.Linear, pc: ParallelConfig, what: str) -> RowParallelLinear:
    return RowParallelLinear(lin.in_features, lin.out_features, pc.tp, pc.tp_rank, what)


def _attention(mla: MLA, pc: ParallelConfig) -> None:
    heads = f"num_attention_heads ({mla.n_heads}) · head dim"
    split(mla.n_heads, pc.tp, pc.tp_rank, "num_attention_heads")
    if mla.q_lora_rank is None:
        mla.q_proj = _column(mla.q_proj, pc, heads)
    else:
        mla.q_b_proj = _column(mla.q_b_proj, pc, heads)
    mla.kv_b_proj = _column(mla.kv_b_proj, pc, heads)
    mla.o_proj = _row(mla.o_proj, pc, heads)
    mla.n_heads //= pc.tp


def _mlp(mlp: MLP, pc: ParallelConfig, what: str) -> None:
    mlp.gate_proj = _column(mlp.gate_proj, pc, what)
    mlp.up_proj = _column(mlp.up_proj, pc, what)
    mlp.down_proj = _row(mlp.down_proj, pc, what)


def _experts(moe: MoE, pc: ParallelConfig) -> None:
    E, two_im, D = moe.experts.gate_up_proj.shape
    Im = two_im // 2
    if pc.ep > 1:  # the same MoE layer holding a range of the experts
        first, end = split(E, pc.ep, pc.ep_rank, "n_routed_experts")
        moe.experts = Experts(E, D, Im, first, end - first)
    else:  # ... or a slice of every expert's intermediate dimension
        i0, i1 = split(Im, pc.tp, pc.tp_rank, "moe_intermediate_size")
        moe.experts = Experts(E, D, Im, inter_shard=Shard(0, i0, i1))
    moe.experts.all_reduce = all_reduce  # the ranks' partial sums meet in one fp32 all-reduce


def _block(block: nn.Module, pc: ParallelConfig) -> None:
    if pc.tp > 1:
        _attention(block.self_attn, pc)
    mlp = block.mlp
    if isinstance(mlp, MoE):
        _experts(mlp, pc)
        if pc.tp > 1 and mlp.shared_experts is not None:
            _mlp(mlp.shared_experts, pc, "n_shared_experts · moe_intermediate_size")
    elif pc.tp > 1:
        _mlp(mlp, pc, "intermediate_size")


def parallelize(model: nn.Module, pc: ParallelConfig) -> nn.Module:
    """Swap this rank's parallel modules into `model` (built on the meta device: weights are loaded after)."""
    if pc.world == 1:
        return model
    cfg = model.config
    device = model.model.embed_tokens.weight.device
    with torch.device(device):
        for block in list(model.model.layers) + [m.block for m in model.model.mtp]:
            _block(block, pc)
        if pc.tp > 1:
            model.model.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, pc.tp, pc.tp_rank)
            model.lm_head = ParallelHead(cfg.hidden_size, cfg.vocab_size, pc.tp, pc.tp_rank)
    model.tie_weights()
    model.parallel = pc
    ops.invalidate(model)
    return model
