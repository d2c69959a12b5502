"""The `dsv3::` operators: their schemas, shape (fake) functions, and PyTorch reference kernels.

The schemas are declared here, once. The native library registers CPU kernels for them in C++
(`dsv3/kernels/csrc/ops.cpp`); PyTorch infers each C++ function's schema and refuses to load a
library whose functions disagree with these declarations, so the Python and C sides are checked
against each other every time the library loads. The reference kernels (`dsv3.ops.reference`) are
registered as `CompositeExplicitAutograd`: any device and any build without the native library
still runs the ops. Fake functions give shapes and dtypes without computing (torch.compile,
meta tensors).
"""

from __future__ import annotations

import torch

from dsv3.ops import reference

SCHEMAS = {
    "rms_norm": "rms_norm(Tensor x, Tensor weight, float eps) -> Tensor",
    "route_noaux": "route_noaux(Tensor x, Tensor weight, Tensor? bias, int n_group, int topk_group, int top_k, "
                   "bool norm, float scale) -> (Tensor, Tensor, Tensor)",
    "linear": "linear(Tensor x, Tensor weight, Tensor? scale, Tensor? bias, int kind, int group) -> Tensor",
    "mlp": "mlp(Tensor x, Tensor?[] lins, int[] meta) -> Tensor",
    "moe": "moe(Tensor x, Tensor idx, Tensor weights, Tensor?[] lins, int[] meta) -> Tensor",
    "mla_decode": "mla_decode(Tensor x, Tensor?[] lins, int[] meta, Tensor? q_norm, Tensor kv_norm, Tensor w_kvb, "
                  "Tensor cos, Tensor sin, Tensor(a!) cache, Tensor slot_mapping, Tensor key_slots, Tensor? key_mask, "
                  "int[] dims, float[] fdims) -> Tensor",
    "mla_attend": "mla_attend(Tensor q, Tensor cache, Tensor key_slots, Tensor? key_lens, int kv_lora_rank, "
                  "float scale) -> Tensor",
    "decode_layers": "decode_layers(Tensor?[] weights, Tensor meta, Tensor fmeta, Tensor(a!) cache, int[] layers, "
                     "Tensor(b!) x, Tensor cos, Tensor sin, Tensor slot_mapping, Tensor key_slots, Tensor? key_mask) -> ()",
    "decode_step": "decode_step(Tensor?[] weights, Tensor meta, Tensor fmeta, Tensor(a!) cache, int[] layers, Tensor ids, "
                   "Tensor? positions, int start, int T, Tensor slot_mapping, Tensor key_slots, Tensor? key_mask, "
                   "Tensor(b!) hidden, Tensor(c!)? logits) -> int",
    "pack_linear": "pack_linear(Tensor weight) -> Tensor",
    "greedy": "greedy(Tensor logits) -> Tensor",
    "screened_greedy": "screened_greedy(Tensor hidden, Tensor weight, Tensor weight_bf16, float weight_norm) -> Tensor",
    "hc_sinkhorn": "hc_sinkhorn(Tensor mixes, Tensor scale, Tensor base, int n, int iters, float eps) -> (Tensor, Tensor, Tensor)",
    "index_topk": "index_topk(Tensor q, Tensor w, Tensor keys, Tensor n_visible, int k) -> (Tensor, Tensor)",
    "mtp_step": "mtp_step(Tensor?[] weights, Tensor meta, Tensor fmeta, Tensor?[] mtp_weights, Tensor mtp_meta, "
                "Tensor mtp_fmeta, Tensor(a!) cache, int[] layers, int mtp_layer, Tensor ids, Tensor starts, "
                "Tensor block_tables, int block_size, int K, Tensor(b!) hidden, Tensor(c!) logits, Tensor(d!) tokens, "
                "Tensor(e!) drafts) -> int",
}

# Ops with GPU kernels only (dsv3.ops.triton registers their CUDA implementations); the references run elsewhere.
# (`mla_attend` has both: a native CPU kernel here, a Triton one in dsv3.ops.triton.)
GPU_SCHEMAS = {
    "fused_moe": "fused_moe(Tensor x, Tensor w13, Tensor w2, Tensor topk_ids, Tensor topk_weights) -> Tensor",
    "fp8_gemm": "fp8_gemm(Tensor x, Tensor weight, Tensor scale_inv) -> Tensor",
}

_lib = torch.library.Library("dsv3", "FRAGMENT")
for _name, _schema in {**SCHEMAS, **GPU_SCHEMAS}.items():
    _lib.define(_schema)
    _lib.impl(_name, getattr(reference, _name), "CompositeExplicitAutograd")


def _out_rows(lins: list, i: int) -> int:
    return lins[3 * i].shape[-2]


@torch.library.register_fake("dsv3::rms_norm")
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.register_fake("dsv3::route_noaux")
def _(x, weight, bias, n_group, topk_group, top_k, norm, scale):
    N, E = x.shape[0], weight.shape[0]
    return (x.new_empty(N, top_k, dtype=torch.float32), x.new_empty(N, top_k, dtype=torch.int64),
            x.new_empty(N, E, dtype=torch.float32))


@torch.library.register_fake("dsv3::linear")
def _(x, weight, scale, bias, kind, group):
    return x.new_empty(*x.shape[:-1], weight.shape[-2])


@torch.library.register_fake("dsv3::mlp")
def _(x, lins, meta):
    return torch.empty_like(x)


@torch.library.register_fake("dsv3::moe")
def _(x, idx, weights, lins, meta):
    return torch.empty_like(x)


@torch.library.register_fake("dsv3::mla_decode")
def _(x, lins, meta, q_norm, kv_norm, w_kvb, cos, sin, cache, slot_mapping, key_slots, key_mask, dims, fdims):
    return torch.empty_like(x)


@torch.library.register_fake("dsv3::decode_layers")
def _(weights, meta, fmeta, cache, layers, x, cos, sin, slot_mapping, key_slots, key_mask):
    return None


@torch.library.register_fake("dsv3::decode_step")
def _(weights, meta, fmeta, cache, layers, ids, positions, start, T, slot_mapping, key_slots, key_mask, hidden, logits):
    return 0


@torch.library.register_fake("dsv3::greedy")
def _(logits):
    return logits.new_empty(logits.shape[0], dtype=torch.int64)


@torch.library.register_fake("dsv3::screened_greedy")
def _(hidden, weight, weight_bf16, weight_norm):
    return hidden.new_empty(hidden.shape[0], dtype=torch.int64)


@torch.library.register_fake("dsv3::pack_linear")
def _(weight):
    return weight.new_empty(0, dtype=torch.uint8)


@torch.library.register_fake("dsv3::mtp_step")
def _(weights, meta, fmeta, mtp_weights, mtp_meta, mtp_fmeta, cache, layers, mtp_layer, ids, starts, block_tables,
      block_size, K, hidden, logits, tokens, drafts):
    return 0


@torch.library.register_fake("dsv3::hc_sinkhorn")
def _(mixes, scale, base, n, iters, eps):
    lead = mixes.shape[:-1]
    return mixes.new_empty(*lead, n), mixes.new_empty(*lead, n), mixes.new_empty(*lead, n, n)


@torch.library.register_fake("dsv3::index_topk")
def _(q, w, keys, n_visible, k):
    kk = min(k, keys.shape[1])
    shape = (q.shape[0], q.shape[1], kk)
    return q.new_empty(shape, dtype=torch.int64), q.new_empty(shape, dtype=torch.bool)


@torch.library.register_fake("dsv3::mla_attend")
def _(q, cache, key_slots, key_lens, kv_lora_rank, scale):
    return q.new_empty(q.shape[0], q.shape[1], kv_lora_rank)


@torch.library.register_fake("dsv3::fused_moe")
def _(x, w13, w2, topk_ids, topk_weights):
    return torch.empty_like(x)


@torch.library.register_fake("dsv3::fp8_gemm")
def _(x, weight, scale_inv):
    return x.new_empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype if x.is_floating_point() else torch.bfloat16)


def registered_cpu_kernels() -> list[str]:
    """The ops that have a native CPU kernel registered now (empty until the library loads)."""
    return [n for n in SCHEMAS if torch._C._dispatch_has_kernel_for_dispatch_key(f"dsv3::{n}", "CPU")]
