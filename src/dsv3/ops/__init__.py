"""The ops layer: what layers call to run a kernel, and the one rule for when a native kernel runs.

Layers describe their weights in native form (`dsv3.ops.forms`: `NativeLinear`, `NativeExperts`,
`NativeMLA`, `NativeBlock`) and call the functions here, which run the registered `dsv3::` op
when the call qualifies and return None when it does not (the layer then runs its PyTorch code).
A call qualifies (`native`) when the native CPU library loaded (`dsv3.kernels.load`, once per
process: the backend is chosen then), the activations are fp32 on the CPU with at most
`MAX_ROWS` rows, autograd is off and torch.compile is not tracing. That rule lives here only.

Whole decode steps run through a plan (`dsv3.ops.plan`), built once from the model and dropped by
`invalidate(model)`, which every operation that changes a model's weights or modules calls.
"""

from __future__ import annotations

import functools

import torch

from dsv3 import kernels
from dsv3.ops import schemas  # noqa: F401  (declares the ops)
from dsv3.ops.forms import NativeBlock, NativeExperts, NativeLinear, NativeMLA, NativeRouter, lins_meta

MAX_ROWS = 8  # tokens per call up to which the native kernels run (decode, MTP verification); more go to PyTorch
MAX_EXPERTS, MAX_GROUPS = 1024, 64  # the native router's stack arrays (V3: 256 experts in 8 groups)
BATCH_ROWS = 256  # rows up to which a whole fp32 decode step runs natively as GEMMs (batch.c: a batched decode)
WHOLE_STEPS = True  # False: each layer runs its own kernel (the path under LoRA or a hook); tests compare the two

__all__ = ["MAX_ROWS", "NativeBlock", "NativeExperts", "NativeLinear", "NativeMLA", "NativeRouter", "backend", "experts",
           "experts_gpu", "gpu", "greedy", "hc_sinkhorn", "index_topk", "invalidate", "linear", "mla_decode", "mlp", "native", "rms_norm", "route_gpu", "route_noaux",
           "screen_head", "screened_greedy"]


def backend(device: torch.device | str = "cpu") -> str:
    """The backend the ops run on for `device`: "native-cpu" (the compiled kernels), "triton-cuda" (dsv3.ops.triton)
    or "torch" (reference)."""
    kind = torch.device(device).type
    if kind == "cuda":
        from dsv3.ops import triton as gpu_kernels

        return "triton-cuda" if gpu_kernels.register() else "torch"
    return "native-cpu" if kind == "cpu" and kernels.load() else "torch"


def gpu(x: torch.Tensor) -> bool:
    """Whether a call on activations `x` runs a CUDA kernel of dsv3.ops.triton: a CUDA tensor, no autograd, not
    compiling, Triton installed (the GPU counterpart of `native`)."""
    if not x.is_cuda or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    from dsv3.ops import triton as gpu_kernels

    return gpu_kernels.register()


def route_gpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n_group: int, topk_group: int,
              top_k: int, norm: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """DeepSeek-V3's router on CUDA (one Triton program per token), or None."""
    if not gpu(x):
        return None
    from dsv3.ops.triton.router import supported

    if not supported(weight.shape[0], n_group):
        return None
    return torch.ops.dsv3.route_noaux(x, weight, bias, n_group, topk_group, top_k, norm, scale)


def experts_gpu(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor) -> torch.Tensor | None:
    """Routed experts on CUDA in one fused MoE (stacked gate_up [E, 2I, D], down [E, D, I]), or None."""
    if not gpu(x) or w13.dtype != x.dtype or w2.dtype != x.dtype:
        return None
    return torch.ops.dsv3.fused_moe(x, w13, w2, idx, weights)


def native(x: torch.Tensor) -> bool:
    """Whether a call on activations `x` runs a native kernel now (the one eligibility rule)."""
    if not (x.is_cpu and x.dtype == torch.float32 and x.numel() <= MAX_ROWS * x.shape[-1]):
        return False
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling() and kernels.load()


NORM_ROWS = 256  # rows up to which RMSNorm runs its native kernel (a batched decode step's; PyTorch's is slower there)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    rows = x.numel() // max(1, x.shape[-1])
    if (rows > NORM_ROWS or not x.is_cpu or x.dtype != torch.float32 or weight.dtype != torch.float32
            or not weight.is_cpu or torch.is_grad_enabled() or torch.compiler.is_compiling() or not kernels.load()):
        return None
    return torch.ops.dsv3.rms_norm(x, weight, eps)


def index_topk(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, n_visible: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """DSA's indexer scores and each query's top-k in one native pass (`dsv3::index_topk`, csrc/index.c), or None
    off the native CPU path (any float dtype; no autograd: the selection has no gradient)."""
    if (not (q.is_cpu and keys.is_cpu) or torch.is_grad_enabled() or torch.compiler.is_compiling()
            or not kernels.load()):
        return None
    return torch.ops.dsv3.index_topk(q, w, keys, n_visible, k)


def hc_sinkhorn(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, n: int, iters: int,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """mHC's split and Sinkhorn in one native call (`dsv3::hc_sinkhorn`, csrc/hyper.c), or None off the native CPU
    path (fp32 CPU mixes, no autograd: training differentiates the layer's PyTorch code, `hyper.sinkhorn_split`)."""
    if (not mixes.is_cpu or mixes.dtype != torch.float32 or not 1 <= n <= 16 or iters < 1
            or torch.is_grad_enabled() or torch.compiler.is_compiling() or not kernels.load()):
        return None
    return torch.ops.dsv3.hc_sinkhorn(mixes, scale, base, n, iters, eps)


def greedy(logits: torch.Tensor) -> torch.Tensor | None:
    """Each row's argmax, NaN never chosen (`dsv3::greedy`), or None off the native CPU path."""
    if (logits.dim() != 2 or not logits.is_cpu or logits.dtype != torch.float32 or not logits.shape[1]
            or torch.compiler.is_compiling() or not kernels.load()):
        return None
    return torch.ops.dsv3.greedy(logits)


def screen_head(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(the fp32 head weight, its bf16 copy, its largest row norm) when `model`'s greedy batched steps can screen
    their head (`screened_greedy`): a native plan with an fp32 head, on a CPU with bf16 arithmetic; else None."""
    from dsv3.ops import plan

    if torch.compiler.is_compiling() or not bf16_arithmetic() or not kernels.load():
        return None
    p = plan.model_plan(model)
    screen = p.screen_head() if p is not None and p.head and not p.observed() else None
    return None if screen is None else (p.weights[3], *screen)


def screened_greedy(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
    """The greedy tokens of post-norm hidden states [M, D] under `model`'s fp32 LM head, screened in bf16 and
    recomputed in fp32 where it matters (`dsv3::screened_greedy`, csrc/screen.c): the fp32 head's argmax at a
    third of its cost. For batched steps (more than MAX_ROWS rows); None otherwise or without `screen_head` (the
    caller computes logits), including when an observer wants the head to run."""
    if (hidden.dim() != 2 or hidden.shape[0] <= MAX_ROWS or hidden.dtype != torch.float32 or not hidden.is_cpu
            or torch.is_grad_enabled()):
        return None
    head = screen_head(model)
    return None if head is None else torch.ops.dsv3.screened_greedy(hidden, *head)


@functools.cache
def bf16_arithmetic() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): elsewhere a bf16 GEMM is emulated, slower
    than fp32."""
    return bool({"avx512_bf16", "amx_bf16"} & kernels.cpu_features())


def route_noaux(x: torch.Tensor, form: NativeRouter | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """DeepSeek-V3's router (sigmoid, noaux_tc) for a few tokens: (weights, ids, scores), or None."""
    if form is None or not native(x) or form.weight.shape[0] > MAX_EXPERTS or form.n_group > MAX_GROUPS:
        return None
    return torch.ops.dsv3.route_noaux(x, form.weight, form.bias, form.n_group, form.topk_group, form.top_k, form.norm,
                                      form.scale)


def linear(x: torch.Tensor, form: NativeLinear | None) -> torch.Tensor | None:
    if form is None or not native(x):
        return None
    return torch.ops.dsv3.linear(x, form.weight, form.scale, form.bias, form.kind, form.group)


def mlp(x: torch.Tensor, gate: NativeLinear | None, up: NativeLinear | None, down: NativeLinear | None) -> torch.Tensor | None:
    """down(silu(gate x) ⊙ up x) in one call, or None."""
    if None in (gate, up, down) or not native(x):
        return None
    return torch.ops.dsv3.mlp(x, *lins_meta([gate, up, down]))


GROUPED_ROWS = 512  # tokens up to which fp32 experts run natively past MAX_ROWS (sorted by expert: a batched decode)


def experts(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, form: NativeExperts | None) -> torch.Tensor | None:
    """Σ_k weights[:, k] · expert_{idx[:, k]}(x) over stacked experts in one call, or None: a decode step's few
    tokens (any weight kind), or up to GROUPED_ROWS tokens of fp32 experts (a batched decode step)."""
    if form is None:
        return None
    if not native(x):
        rows = x.numel() // max(1, x.shape[-1])
        if (rows > GROUPED_ROWS or not x.is_cpu or x.dtype != torch.float32 or torch.is_grad_enabled()
                or torch.compiler.is_compiling() or any(f.kind for f in form) or not kernels.load()):
            return None
    return torch.ops.dsv3.moe(x, idx.to(torch.int64), weights.to(torch.float32), *lins_meta([form.gate, form.up, form.down]))


def mla_decode(x: torch.Tensor, form: NativeMLA | None, cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor,
               slot_mapping: torch.Tensor, key_slots: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor | None:
    """A whole MLA layer for a few tokens: latents written to `cache` [slots, C + dr], attention over key_slots."""
    if form is None or not native(x):
        return None
    lins, meta = lins_meta([form.q_a, form.q_b, form.kv_a, form.o])
    return torch.ops.dsv3.mla_decode(x, lins, meta, form.q_norm, form.kv_norm, form.w_kvb, cos, sin, cache, slot_mapping,
                                     key_slots, key_mask, list(form.dims), list(form.fdims))


def invalidate(model: torch.nn.Module | None = None) -> None:
    """Make every decode plan built so far stale, and (given `model`) drop what its layers derived for the kernels
    (int4 layouts, dequantized kv_b). dsv3's own operations that replace modules or parameters call this; call it
    after replacing a model's modules or parameters yourself."""
    from dsv3.ops import plan

    plan.changed()
    for m in model.modules() if model is not None else ():
        reset = getattr(m, "reset_native", None)
        if callable(reset):
            reset()


def _steps_ok(ids_or_x: torch.Tensor, rows: int, limit: int = MAX_ROWS) -> bool:
    return (WHOLE_STEPS and rows <= limit and ids_or_x.is_cpu and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and kernels.load())


def decode_step(model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor | None, start: int,
                cache: torch.Tensor | None, keys: tuple | None, logits: bool,
                fresh_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A decode step of the whole model in one call: (post-norm hidden [B, T, D], logits [B, T, V] when asked and
    the head is native, else None), or None when the step has no native form (the model runs its modules).

    `cache`: every layer's latent cache ([layers, ..., C + dr]); `keys`: this step's (slot_mapping, key_slots,
    key_mask). With logits, the hidden states land in a buffer the next step reuses unless `fresh_hidden`."""
    from dsv3.ops import plan

    B, T = input_ids.shape
    M = B * T
    if cache is None or keys is None or not _steps_ok(input_ids, M, BATCH_ROWS):
        return None
    p = plan.model_plan(model)
    if p is None or p.observed() or (M > MAX_ROWS and not p.batched):
        return None
    if M > MAX_ROWS:
        p.pack_batched(head=logits)
    slot_mapping, key_slots, key_mask = keys
    ids = input_ids if input_ids.dtype == torch.int64 and input_ids.is_contiguous() else input_ids.to(torch.int64).contiguous()
    pos = None if positions is None else positions.to(torch.int64).contiguous()
    out = torch.empty(B, T, p.vocab, dtype=torch.float32) if logits and p.head else None
    hidden = torch.empty(B, T, p.hidden_size) if out is None or fresh_hidden else p.hidden(M)
    bad = torch.ops.dsv3.decode_step(p.weights, p.meta, p.fmeta, cache, p.layers, ids, pos, start, T, slot_mapping,
                                     key_slots, key_mask, hidden, out)
    if bad:
        raise IndexError(f"token id {int(ids.reshape(-1)[bad - 1])} is out of range for the vocabulary of {p.vocab}")
    return hidden.view(B, T, p.hidden_size), out


def mtp_step(model: torch.nn.Module, ids: torch.Tensor, starts: torch.Tensor, block_tables: torch.Tensor,
             block_size: int, K: int, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                             torch.Tensor] | None:
    """A greedy MTP speculative step in one call (`dsv3::mtp_step`), or None when the model or step has no native
    form: ids [B, 2K] (row 0 the last token at position starts[b], rows 1..K its drafts, the rest only lend their
    positions to chained drafts), block_tables [B, W] over `cache` (every layer's latent entries). Returns
    (hidden [B(K+1), D], logits [B(K+1), V] of the verified rows, tokens [B, K+1]: accepted drafts and the target's
    next token, -1 after them, drafts [B, K] for the next step)."""
    from dsv3.ops import plan

    B, R = ids.shape
    if cache is None or R != 2 * K or not _steps_ok(ids, B * (K + 1)):
        return None
    p, t = plan.model_plan(model), plan.mtp_plan(model)
    if p is None or t is None or not p.head or p.observed() or t.observed():
        return None
    M1 = B * (K + 1)
    hidden, logits = torch.empty(M1, p.hidden_size), torch.empty(M1, p.vocab)
    tokens, drafts = torch.empty(B, K + 1, dtype=torch.int64), torch.empty(B, K, dtype=torch.int64)
    bad = torch.ops.dsv3.mtp_step(p.weights, p.meta, p.fmeta, t.weights, t.meta, t.fmeta, cache, p.layers, t.layers[0],
                                  ids, starts, block_tables, block_size, K, hidden, logits, tokens, drafts)
    if bad:
        rows = torch.arange(B)[:, None] * R + torch.arange(K + 1)[None]
        raise IndexError(f"token id {int(ids.reshape(-1)[rows.reshape(-1)][bad - 1])} is out of range for the "
                         f"vocabulary of {p.vocab}")
    return hidden, logits, tokens, drafts


def decode_layers(owner: torch.nn.Module, blocks: list[torch.nn.Module], x: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, cache: torch.Tensor | None, keys: tuple | None) -> torch.Tensor | None:
    """x [B, T, D] through `blocks` (the residual stream, no final norm) in one call, or None. The MTP module's
    block runs here; its plan is cached on `owner`."""
    from dsv3.ops import plan

    B, T, D = x.shape
    if cache is None or keys is None or not blocks or x.dtype != torch.float32 or not _steps_ok(x, B * T):
        return None
    p = plan.blocks_plan(owner, blocks)
    if p is None or p.observed():
        return None
    y = x.reshape(B * T, D).clone()
    slot_mapping, key_slots, key_mask = keys
    torch.ops.dsv3.decode_layers(p.weights, p.meta, p.fmeta, cache, p.layers, y, cos.reshape(B * T, -1),
                                 sin.reshape(B * T, -1), slot_mapping, key_slots, key_mask)
    return y.view(B, T, D)
