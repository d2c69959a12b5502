"""Native forms: how a layer's weights look to the kernels, declared by the layers themselves.

A layer that a kernel can run offers `native_form()` returning one of these (or None when it has
no native form now: bf16 or FP8 weights, a LoRA wrapper, a tensor-parallel shard). Nothing here
points into memory: the tensors are passed to the `dsv3::` ops at each call, which read where
they live then.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class NativeLinear(NamedTuple):
    """kind 0: fp32 weight [N, K]; 1: int8 [N, K] + fp32 scale [N]; 2: int4, uint8 [N, K/2] in blocks of 32 values
    (byte j: value j low nibble, j+16 high) + fp32 scale and bias [N, K/group] (w = u·scale + bias). Stacked experts
    carry a leading [E] dimension."""

    kind: int
    weight: torch.Tensor
    scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    group: int = 0

    @property
    def out_features(self) -> int:
        return self.weight.shape[-2]


class NativeExperts(NamedTuple):
    """Stacked routed experts: gate, up [E, I, D] and down [E, D, I] as NativeLinear. Gate and up given as the
    same tensor are a fused [E, 2I, D] stack (gate_up_proj): gate its first I rows of each expert, up the rest."""

    gate: NativeLinear
    up: NativeLinear
    down: NativeLinear


class NativeRouter(NamedTuple):
    """DeepSeek-V3's sigmoid, bias-corrected, group-limited router (`noaux_tc`)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    n_group: int
    topk_group: int
    top_k: int
    norm: bool
    scale: float


class NativeMLA(NamedTuple):
    """One MLA layer: projections (q_a None for a direct q_proj given as q_b), norms, kv_b as [H, dn+dv, C],
    dims (D, H, dn, dr, dv, C, Rq) and (q_eps, kv_eps, softmax scale)."""

    q_a: NativeLinear | None
    q_b: NativeLinear
    kv_a: NativeLinear
    o: NativeLinear
    q_norm: torch.Tensor | None
    kv_norm: torch.Tensor
    w_kvb: torch.Tensor
    dims: tuple[int, int, int, int, int, int, int]
    fdims: tuple[float, float, float]


class NativeBlock(NamedTuple):
    """A pre-norm block: x + MLA(norm(x)), then + FFN(norm(x)); the FFN is a dense MLP, or routed experts
    plus optional shared experts (`mlp`)."""

    mla: NativeMLA
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    mlp: tuple[NativeLinear, NativeLinear, NativeLinear] | None
    router: NativeRouter | None = None
    experts: NativeExperts | None = None


def lins_meta(lins: list[NativeLinear | None]) -> tuple[list[torch.Tensor | None], list[int]]:
    """The (weight, scale, bias) list and (kind, group) list a `Tensor?[] lins, int[] meta` op argument takes."""
    tensors: list[torch.Tensor | None] = []
    meta: list[int] = []
    for lin in lins:
        if lin is None:
            tensors += [None, None, None]
            meta += [0, 0]
        else:
            tensors += [lin.weight, lin.scale, lin.bias]
            meta += [lin.kind, lin.group]
    return tensors, meta


def f32_cpu(*tensors: torch.Tensor | None) -> bool:
    """Every given tensor is an fp32, contiguous CPU tensor (what the native forms of fp32 weights need)."""
    return all(t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() for t in tensors if t is not None)


class NativeModel(NamedTuple):
    """Everything a whole decode step reads: the embedding, rotary frequencies (cos/sin scaled by attn_factor),
    the blocks with their cache layers, the final norm, and the LM head (None: no native head)."""

    embed: torch.Tensor
    inv_freq: torch.Tensor
    attn_factor: float
    blocks: list[NativeBlock]
    layer_ids: list[int]
    final_norm: torch.Tensor
    final_eps: float
    head: NativeLinear | None


class NativeMTP(NamedTuple):
    """The MTP module as a greedy drafter (`dsv3::mtp_step`): enorm / hnorm over the next token's embedding and the
    hidden state, eh_proj, one block (cache layer `layer_id`), its output norm, and the draft head, whose rows are
    the tokens `draft_ids` (None: the whole vocabulary, the LM head itself)."""

    block: NativeBlock
    layer_id: int
    enorm: torch.Tensor
    hnorm: torch.Tensor
    e_eps: float
    h_eps: float
    eh: NativeLinear
    final_norm: torch.Tensor
    final_eps: float
    head: NativeLinear
    draft_ids: torch.Tensor | None = None
