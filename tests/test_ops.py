"""The ops layer: `dsv3::` op schemas against the C++ side, native kernels against the PyTorch reference,
decode plans under every kind of weight change, and the build's cache key and fallbacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3 import kernels, ops
from dsv3.config import ModelConfig
from dsv3.models.deepseek_v3 import DeepseekV3ForCausalLM
from dsv3.ops import layout, reference, schemas
from dsv3.ops.forms import NativeLinear, lins_meta
from dsv3.quant import kernels as quant_kernels
from dsv3.quant.apply import quantize_model
from tiny_model import TINY

ROOT = Path(__file__).parents[1]
native_only = pytest.mark.skipif(kernels.compilers() is None, reason="no C/C++ compiler")


# ---- schemas: declared in Python, checked against the C++ functions when the library loads ------------------

@native_only
def test_every_op_has_a_native_kernel_with_the_declared_schema():
    assert kernels.load(), kernels.status()
    assert sorted(schemas.registered_cpu_kernels()) == sorted(schemas.SCHEMAS)
    for name, schema in schemas.SCHEMAS.items():
        assert str(getattr(torch.ops.dsv3, name).default._schema) == f"dsv3::{schema}"
    assert tuple(torch.ops.dsv3_native.plan_layout()) == layout.LAYOUT  # the plan layout the C++ side reads


@native_only
def test_a_library_that_disagrees_with_a_schema_is_refused_not_loaded(tmp_path):
    """PyTorch aborts a process whose library registers a kernel with another signature than the schema:
    `validate` tries it in a child process, so the server falls back instead of dying."""
    src = tmp_path / "bad.cpp"
    src.write_text('#include <torch/library.h>\n#include <ATen/core/Tensor.h>\n'
                   'at::Tensor bad(const at::Tensor& x, const at::Tensor& w) { return x; }\n'
                   'TORCH_LIBRARY_IMPL(dsv3, CPU, m) { m.impl("rms_norm", &bad); }\n')
    _, cxx = kernels.compilers()
    _, includes, links, defines = kernels._torch_build()
    so = tmp_path / "bad.so"
    subprocess.run([cxx, "-shared", "-fPIC", "-std=c++17", "-w", *defines, *includes, str(src), "-o", str(so), *links],
                   check=True, capture_output=True)
    why = kernels.validate(so)
    assert why is not None and "doesn't match the expected function schema" in why


# ---- native kernels against the PyTorch reference --------------------------------------------------------------

def _int4(N: int, K: int, group: int, g: torch.Generator, E: int | None = None) -> NativeLinear:
    lead = (E,) if E else ()
    packed = torch.randint(0, 256, (*lead, N, K // 2), dtype=torch.uint8, generator=g)
    scale = torch.rand(*lead, N, K // group, generator=g) * 0.02
    bias = -8 * scale
    return NativeLinear(2, packed, scale, bias, group)


def _lin(kind: int, N: int, K: int, g: torch.Generator, E: int | None = None) -> NativeLinear:
    lead = (E,) if E else ()
    if kind == 0:
        return NativeLinear(0, torch.randn(*lead, N, K, generator=g) * 0.1)
    if kind == 1:
        return NativeLinear(1, torch.randint(-127, 128, (*lead, N, K), dtype=torch.int8, generator=g),
                            torch.rand(*lead, N, generator=g) * 0.01)
    return _int4(N, K, 32, g, E)


@native_only
@pytest.mark.parametrize("kind", [0, 1, 2])
@torch.no_grad()
def test_linear_mlp_and_experts_match_the_reference(kind):
    g = torch.Generator().manual_seed(kind)
    x = torch.randn(3, 64, generator=g)
    lin = _lin(kind, 48, 64, g)
    torch.testing.assert_close(torch.ops.dsv3.linear(x, lin.weight, lin.scale, lin.bias, lin.kind, lin.group),
                               reference.linear(x, lin.weight, lin.scale, lin.bias, lin.kind, lin.group), atol=1e-4, rtol=1e-4)
    mlp = lins_meta([_lin(kind, 96, 64, g), _lin(kind, 96, 64, g), _lin(kind, 64, 96, g)])
    torch.testing.assert_close(torch.ops.dsv3.mlp(x, *mlp), reference.mlp(x, *mlp), atol=1e-4, rtol=1e-4)
    E, K = 8, 3
    ex = lins_meta([_lin(kind, 32, 64, g, E), _lin(kind, 32, 64, g, E), _lin(kind, 64, 32, g, E)])
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(3)])
    wt = torch.rand(3, K, generator=g)
    torch.testing.assert_close(torch.ops.dsv3.moe(x, idx, wt, *ex), reference.moe(x, idx, wt, *ex), atol=1e-4, rtol=1e-4)


@native_only
@torch.no_grad()
def test_router_and_rms_norm_match_the_reference():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(5, 48, generator=g), torch.randn(32, 48, generator=g) * 0.3, torch.randn(32, generator=g) * 0.2
    got, want = torch.ops.dsv3.route_noaux(x, w, b, 4, 2, 6, True, 2.5), reference.route_noaux(x, w, b, 4, 2, 6, True, 2.5)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0]) and torch.testing.assert_close(got[2], want[2])
    wn = torch.rand(48, generator=g) + 0.5
    torch.testing.assert_close(torch.ops.dsv3.rms_norm(x, wn, 1e-6), reference.rms_norm(x, wn, 1e-6), atol=1e-6, rtol=1e-5)


@native_only
@pytest.mark.parametrize("q_lora", [24, 0])
@torch.no_grad()
def test_mla_decode_matches_the_reference_and_writes_the_same_cache(q_lora):
    g = torch.Generator().manual_seed(q_lora)
    D, H, dn, dr, dv, C = 64, 4, 16, 8, 16, 32
    M, slots, S = 3, 40, 12
    lins = [_lin(0, q_lora, D, g) if q_lora else None, _lin(0, H * (dn + dr), q_lora or D, g), _lin(0, C + dr, D, g),
            _lin(0, D, H * dv, g)]
    tensors, meta = lins_meta(lins)
    q_norm = torch.rand(q_lora, generator=g) + 0.5 if q_lora else None
    kv_norm, w_kvb = torch.rand(C, generator=g) + 0.5, torch.randn(H, dn + dv, C, generator=g) * 0.1
    x = torch.randn(M, D, generator=g)
    ang = torch.rand(M, dr // 2, generator=g) * 6
    cache = torch.randn(slots, C + dr, generator=g)
    slot_mapping = torch.tensor([30, 31, 32])
    key_slots = torch.randint(0, slots, (M, S), generator=g)
    key_slots[:, -1] = slot_mapping
    key_mask = torch.rand(M, S, generator=g) > 0.3
    key_mask[:, -1] = True
    args = (q_norm, kv_norm, w_kvb, ang.cos(), ang.sin())
    keys = (slot_mapping, key_slots, key_mask, [D, H, dn, dr, dv, C, q_lora], [1e-6, 1e-6, 0.2])
    c1, c2 = cache.clone(), cache.clone()
    got = torch.ops.dsv3.mla_decode(x, tensors, meta, *args, c1, *keys)
    want = reference.mla_decode(x, tensors, meta, *args, c2, *keys)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(c1, c2, atol=1e-5, rtol=1e-5)


@native_only
@torch.no_grad()
def test_whole_step_matches_the_reference_op():
    """`dsv3::decode_step` against its reference kernel on a real model's plan (the same tensors, the same cache)."""
    from dsv3.attention import DenseLatentCache
    from dsv3.ops import plan

    model = _model()
    cfg = model.config
    p = plan.model_plan(model)
    assert p is not None and p.head
    cache = DenseLatentCache(cfg.num_hidden_layers, 1, 16, cfg.latent_dim, torch.float32)
    model(torch.arange(3, 10)[None], ctx=cache)  # a prefill fills the cache
    cache.begin_step(1)
    ids = torch.tensor([[11]])
    slot_mapping, key_slots, key_mask = cache.native_slots()
    outs = []
    for fn in (torch.ops.dsv3.decode_step, reference.decode_step):
        kv = cache.kv.clone()
        hidden, logits = torch.empty(1, cfg.hidden_size), torch.empty(1, cfg.vocab_size)
        assert fn(p.weights, p.meta, p.fmeta, kv, p.layers, ids, None, cache.length, 1, slot_mapping, key_slots,
                  key_mask, hidden, logits) == 0
        outs.append((hidden, logits, kv))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _batched_step_vs_reference(model, weights: list) -> None:
    """A 24-row decode step of `model` through `dsv3::decode_step` with these plan weights (batch.c) against the
    reference op: sequences whose left padding differs (per-row key masks); hidden, logits and cache agree."""
    from dsv3.attention import DenseLatentCache
    from dsv3.ops import plan

    cfg = model.config
    p = plan.model_plan(model)
    B, T = 24, 9
    assert B > ops.MAX_ROWS
    g = torch.Generator().manual_seed(1)
    cache = DenseLatentCache(cfg.num_hidden_layers, B, 16, cfg.latent_dim, torch.float32)
    pad = torch.arange(T)[None] >= torch.randint(0, 5, (B, 1), generator=g)  # each row's first tokens are padding
    cache.set_padding(pad.long())
    model(torch.randint(3, cfg.vocab_size, (B, T), generator=g), ctx=cache)
    cache.begin_step(1)
    ids = torch.randint(3, cfg.vocab_size, (B, 1), generator=g)
    slot_mapping, key_slots, key_mask = cache.native_slots()
    assert key_mask is not None and not bool(key_mask.all())
    outs = []
    for fn in (torch.ops.dsv3.decode_step, reference.decode_step):
        kv = cache.kv.clone()
        hidden, logits = torch.empty(B, cfg.hidden_size), torch.empty(B, cfg.vocab_size)
        assert fn(weights, p.meta, p.fmeta, kv, p.layers, ids, None, cache.length, 1, slot_mapping, key_slots,
                  key_mask, hidden, logits) == 0
        outs.append((hidden, logits, kv))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@native_only
@torch.no_grad()
@pytest.mark.parametrize("packed,q_lora", [(False, 32), (True, 32), (True, 0)], ids=["as-stored", "packed", "packed-q-proj"])
def test_batched_whole_step_matches_the_reference_op(packed, q_lora):
    """Past MAX_ROWS rows an fp32 plan's step runs batch.c (each projection, each expert's rows and the head one BLAS
    GEMM, attention in place over the cache): against the reference op, with the weights as stored and with the
    projections and head packed by `dsv3::pack_linear` (`Plan.pack_batched`); also a model whose query is one
    projection (V2-Lite's q_proj: no q_a, q_b takes the hidden state)."""
    from dsv3.ops import plan

    model = _model(q_lora_rank=q_lora)
    p = plan.model_plan(model)
    assert p is not None and p.batched and kernels.load()
    p.pack_batched(head=True)
    weights = list(p.weights)
    slots = [layout.MODEL_WEIGHTS - 1] + [b + plan._PACKED0 + j for b in range(layout.MODEL_WEIGHTS, len(weights), layout.LAYER_WEIGHTS)
                                          for j, i in enumerate(plan.PACKABLE) if weights[b + i] is not None]
    assert len(slots) > 1 + 4 * model.config.num_hidden_layers  # the head, every attention projection, the MLPs
    for s in slots:
        if not packed:
            weights[s] = None
        elif os.environ.get("DSV3_BLAS") == "0":  # as a build without MKL: no bytes, the weights run as stored
            assert weights[s].numel() == 0
        elif torch.backends.mkl.is_available():
            assert weights[s].numel() > 0  # MKL: really packed
    _batched_step_vs_reference(model, weights)


@native_only
@torch.no_grad()
def test_whole_step_refuses_more_heads_than_its_kernels_hold():
    """batch.c's attention keeps per-head arrays of 256: a plan claiming more heads is refused before any kernel."""
    from dsv3.ops import plan

    assert kernels.load()
    model = _model()
    p = plan.model_plan(model)
    meta = p.meta.clone()
    meta[layout.MODEL_INTS + 1] = 300  # layer 0's H
    ids = torch.tensor([[5]])
    with pytest.raises(RuntimeError, match="256 heads"):
        torch.ops.dsv3.decode_step(p.weights, meta, p.fmeta, torch.zeros(1, 1, 1), p.layers, ids, None, 0, 1,
                                   torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), None,
                                   torch.empty(1, model.config.hidden_size), None)


@native_only
@torch.no_grad()
def test_packed_copies_follow_a_weight_changed_in_place_or_given_new_storage():
    """A plan's packed copies are re-made for a weight modified in place or whose `.data` was swapped since they were
    packed (the step then equals the reference on the new weights), and kept otherwise (not re-packed every step)."""
    from dsv3.ops import plan

    model = _model()
    p = plan.model_plan(model)
    p.pack_batched(head=True)
    q_b, q_b_slot = layout.MODEL_WEIGHTS + 3, layout.MODEL_WEIGHTS + plan._PACKED0 + 1
    head_slot = layout.MODEL_WEIGHTS - 1
    kept = p.weights[q_b_slot], p.weights[head_slot]
    p.pack_batched(head=True)
    assert p.weights[q_b_slot] is kept[0] and p.weights[head_slot] is kept[1]
    p.weights[q_b].mul_(2.0)  # in place: the version counter moves
    p.pack_batched(head=True)
    assert p.weights[q_b_slot] is not kept[0] and p.weights[head_slot] is kept[1]
    head = p.weights[3]
    head.data = head.data * 0.5  # new storage
    p.pack_batched(head=True)
    assert p.weights[head_slot] is not kept[1]
    _batched_step_vs_reference(model, p.weights)


@native_only
@pytest.mark.parametrize("V, K", [(32000, 512), (1003, 40)])
def test_screened_greedy_is_the_fp32_heads_argmax(V, K):
    """`dsv3::screened_greedy` (a bf16 screen, then fp32 for every column within its error bound of a row's best)
    gives the fp32 head's argmax. The head is crowded (every row a common vector plus 2 % noise), so that in some
    rows the bf16 product ranks the fp32 winner below another column (checked: a screen recomputing only the bf16
    maximum fails there); also rows it cannot bound (NaN or inf hidden states: recomputed whole) or that tie
    everywhere (zeros). A vocabulary's width and one no multiple of 16."""
    assert kernels.load(), kernels.status()
    g = torch.Generator().manual_seed(V)
    h = torch.randn(128, K, generator=g)
    w = torch.randn(K, generator=g) * 0.05 + torch.randn(V, K, generator=g) * 0.001
    exact = (h.double() @ w.double().T).argmax(1)
    bf16 = torch.mm(h.bfloat16(), w.bfloat16().T).float()
    assert (bf16.gather(1, exact[:, None])[:, 0] < bf16.amax(1)).any()  # the bf16 maximum alone would be wrong
    h[10, 3] = float("nan")
    h[11, 5] = float("inf")
    h[12] = 0.0
    norm = float(w.norm(dim=1).max())
    out = torch.ops.dsv3.screened_greedy(h, w, w.bfloat16(), norm)
    assert torch.equal(out, reference.screened_greedy(h, w, w.bfloat16(), norm))
    keep = torch.ones(128, dtype=torch.bool)
    keep[10:13] = False
    assert torch.equal(out[keep], exact[keep])
    assert int(out[10]) == 0 and int(out[12]) == 0  # all NaN: 0, as `dsv3::greedy`; all zero: the first
    assert float(h[11] @ w[int(out[11])]) == float("inf")
    assert torch.equal(torch.ops.dsv3.screened_greedy(h[:0], w, w.bfloat16(), norm), torch.empty(0, dtype=torch.int64))


@native_only
def test_screened_greedy_refuses_bad_input_with_a_message():
    assert kernels.load(), kernels.status()
    w, h = torch.randn(50, 16), torch.randn(9, 16)
    with pytest.raises(RuntimeError, match="weight_bf16 must be a contiguous bf16"):
        torch.ops.dsv3.screened_greedy(h, w, w, 1.0)
    with pytest.raises(RuntimeError, match="weight_bf16 must be"):
        torch.ops.dsv3.screened_greedy(h, w, w[:49].bfloat16(), 1.0)
    with pytest.raises(RuntimeError, match=r"hidden \[M, K\], weight \[V, K\]"):
        torch.ops.dsv3.screened_greedy(h[:, :8], w, w.bfloat16(), 1.0)
    with pytest.raises(RuntimeError, match="weight_norm must be >= 0"):
        torch.ops.dsv3.screened_greedy(h, w, w.bfloat16(), -1.0)


@native_only
def test_screened_head_follows_the_model_and_steps_aside(monkeypatch):
    """`ops.screened_greedy(model, hidden)`: the fp32 head's argmax past MAX_ROWS rows (None at or below, under a
    forward hook on the head, without bf16 arithmetic, or for a quantized head); its bf16 copy is re-made after the head changes in place
    or gets new storage, and kept otherwise."""
    from dsv3.ops import plan

    monkeypatch.setattr(ops, "bf16_arithmetic", lambda: True)  # the op runs anywhere; the engine asks the CPU
    model = _model()
    h = torch.randn(ops.MAX_ROWS + 4, model.config.hidden_size)
    with torch.inference_mode():
        assert torch.equal(ops.screened_greedy(model, h), model.lm_head(h).argmax(-1))
        kept = plan.model_plan(model).screen_head()[0]
        ops.screened_greedy(model, h)
        assert plan.model_plan(model).screen_head()[0] is kept
        assert ops.screened_greedy(model, h[:ops.MAX_ROWS]) is None
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # in place
    with torch.inference_mode():
        assert torch.equal(ops.screened_greedy(model, h), model.lm_head(h).argmax(-1))
        model.lm_head.weight.data = model.lm_head.weight.data.flip(0)  # new storage
        assert torch.equal(ops.screened_greedy(model, h), model.lm_head(h).argmax(-1))
        hook = model.lm_head.register_forward_hook(lambda *a: None)
        assert ops.screened_greedy(model, h) is None
        hook.remove()
        monkeypatch.setattr(ops, "bf16_arithmetic", lambda: False)
        assert ops.screened_greedy(model, h) is None
    monkeypatch.setattr(ops, "bf16_arithmetic", lambda: True)
    quantize_model(model, "int8", include_lm_head=True, progress=False)  # an int8 head: its logits, not a screen
    with torch.inference_mode():
        assert ops.screen_head(model) is None and ops.screened_greedy(model, h) is None


@native_only
def test_batched_step_without_the_blas_symbols_takes_at_mm():
    """A PyTorch whose BLAS exports no `sgemm_` / packed GEMM (DSV3_BLAS=0 stands in for one): batch.c's GEMMs run
    `at::mm` on views of the same memory, `pack_linear` gives no bytes, and the step still equals the reference."""
    env = {**os.environ, "DSV3_BLAS": "0"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_ops.py", "-k",
                          "test_batched_whole_step_matches_the_reference_op"], env=env, capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0 and "3 passed" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


@native_only
def test_pack_linear_refuses_what_it_cannot_pack():
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.dsv3.pack_linear(torch.zeros(4, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"\[N, K\]"):
        torch.ops.dsv3.pack_linear(torch.zeros(4))


@native_only
def test_greedy_op_matches_the_reference():
    """`dsv3::greedy` (one vector pass per row) against argmax over NaN-as--inf, at a vocabulary's width and one
    that is no multiple of 16: ties, NaN, +inf, rows of only -inf or NaN, the maximum in the last columns."""
    g = torch.Generator().manual_seed(0)
    for V in (32000, 1003):
        x = torch.randint(-4, 4, (40, V), generator=g).float()
        x[1, 7] = float("nan")
        x[2] = float("nan")
        x[3] = float("-inf")
        x[4, ::3] = float("nan")
        x[5, 100] = float("inf")
        x[6, -1] = 99.0
        x[7, :] = float("-inf")
        x[7, 500] = float("nan")
        x[8, 17] = x[8, 33] = 50.0
        torch.testing.assert_close(torch.ops.dsv3.greedy(x), reference.greedy(x), rtol=0, atol=0)
        assert torch.equal(ops.greedy(x), torch.nan_to_num(x, nan=float("-inf"), posinf=float("inf")).argmax(-1))


@native_only
@torch.no_grad()
@pytest.mark.parametrize("K", [1, 2])
def test_mtp_step_matches_the_reference_op(K):
    """`dsv3::mtp_step` against its reference: verified logits, accepted tokens, next drafts and every cache layer
    (the MTP layer's included), with one sequence accepting all its drafts, one none; paged block tables."""
    from dsv3.ops import plan

    assert kernels.load()
    model = _model()
    cfg = model.config
    p, t = plan.model_plan(model), plan.mtp_plan(model)
    assert p is not None and t is not None and t.layers == [cfg.num_hidden_layers]
    B, bs = 2, 4
    starts = torch.tensor([9, 14])
    tables = torch.tensor([[5, 2, 7, 0, 0], [1, 3, 4, 6, 8]])  # sequence 0 uses 3 blocks, 1 all 5
    kv0 = torch.randn(cfg.num_hidden_layers + 1, 9 * bs, cfg.latent_dim, generator=torch.Generator().manual_seed(0))

    def run(fn, ids):
        kv, M1 = kv0.clone(), B * (K + 1)
        hidden, logits = torch.empty(M1, cfg.hidden_size), torch.empty(M1, cfg.vocab_size)
        tokens, drafts = torch.empty(B, K + 1, dtype=torch.long), torch.empty(B, K, dtype=torch.long)
        assert fn(p.weights, p.meta, p.fmeta, t.weights, t.meta, t.fmeta, kv, p.layers, t.layers[0], ids, starts, tables,
                  bs, K, hidden, logits, tokens, drafts) == 0
        return hidden, logits, tokens, drafts, kv

    ids = torch.tensor([[5] + [7] * (2 * K - 1), [8] + [9] * (2 * K - 1)])
    # the target's own greedy continuation of sequence 0, found one verified row at a time, is accepted in full
    for j in range(K):
        ids[0, j + 1] = run(torch.ops.dsv3.mtp_step, ids)[2][0, j]
    ids[1, 1] = (run(torch.ops.dsv3.mtp_step, ids)[2][1, 0] + 1) % cfg.vocab_size  # sequence 1's first draft is wrong
    native, ref = run(torch.ops.dsv3.mtp_step, ids), run(reference.mtp_step, ids)
    tokens = native[2]
    assert tokens[0].tolist() == ids[0, 1:K + 1].tolist() + [tokens[0, K].item()] and tokens[0, K] >= 0
    assert tokens[1, 0] >= 0 and (tokens[1, 1:] == -1).all()
    for a, b in zip(native, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # the main layers wrote positions n .. n+K, the MTP layer n .. n+a+K-1 (a accepted drafts), nothing else
    changed = (native[4] != kv0).any(-1)
    L = cfg.num_hidden_layers
    for layer, rows in ((0, [K + 1, K + 1]), (L, [K + K, 0 + K])):
        want = torch.zeros_like(changed[0])
        for b in range(B):
            for pos in range(int(starts[b]), int(starts[b]) + rows[b]):
                want[tables[b, pos // bs] * bs + pos % bs] = True
        assert torch.equal(changed[layer], want)


@native_only
@torch.no_grad()
def test_mtp_step_refuses_bad_input_with_a_message():
    from dsv3.ops import plan

    assert kernels.load()
    model = _model()
    cfg = model.config
    p, t = plan.model_plan(model), plan.mtp_plan(model)
    kv = torch.zeros(cfg.num_hidden_layers + 1, 16, cfg.latent_dim)

    def call(ids, starts=(3,), tables=((0, 1),), drafts=None):
        return torch.ops.dsv3.mtp_step(p.weights, p.meta, p.fmeta, t.weights, t.meta, t.fmeta, kv, p.layers, t.layers[0],
                                       ids, torch.tensor(starts), torch.tensor(tables), 4, 1,
                                       torch.empty(2, cfg.hidden_size), torch.empty(2, cfg.vocab_size),
                                       torch.empty(1, 2, dtype=torch.long),
                                       torch.empty(1, 1, dtype=torch.long) if drafts is None else drafts)

    assert call(torch.tensor([[3, cfg.vocab_size]])) == 2  # 1 + the row of the id outside the vocabulary
    with pytest.raises(RuntimeError, match=r"ids must be contiguous int64 \[B, 2K\]"):
        call(torch.tensor([[3, 4, 5]]))
    with pytest.raises(RuntimeError, match="drafts"):
        call(torch.tensor([[3, 4]]), drafts=torch.empty(1, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="outside the cache's 4 blocks"):
        call(torch.tensor([[3, 4]]), tables=((0, 4),))
    with pytest.raises(RuntimeError, match="must hold positions up to start"):
        call(torch.tensor([[3, 4]]), starts=(7,))


@native_only
@pytest.mark.parametrize("M,H,C,dr", [(5, 4, 32, 8), (64, 8, 128, 32), (2, 128, 512, 64)])
def test_mla_attend_matches_the_reference(M, H, C, dr):
    """The CPU kernel of `dsv3::mla_attend` (batched decode attention read from the cache): runs of consecutive
    slots (a paged block) and scattered ones, -1 holes, key_lens cutting rows short (0: no keys), int32 slots."""
    assert kernels.load()
    g = torch.Generator().manual_seed(M)
    W = C + dr
    cache, q = torch.randn(400, W, generator=g), torch.randn(M, H, W, generator=g)
    slots = torch.randint(0, 400, (M, 70), generator=g)
    slots[0, :48] = torch.arange(100, 148)
    slots[1, 3] = -1
    lens = torch.randint(0, 71, (M,), generator=g)
    lens[-1] = 0
    for ks, kl in ((slots, lens), (slots, None), (slots.int(), lens.int())):
        got = torch.ops.dsv3.mla_attend(q, cache, ks, kl, C, 0.1)
        torch.testing.assert_close(got, reference.mla_attend(q, cache, ks, kl, C, 0.1), atol=2e-5, rtol=1e-4)
    assert (torch.ops.dsv3.mla_attend(q, cache, slots, lens, C, 0.1)[-1] == 0).all()
    with pytest.raises(RuntimeError, match="slots of the cache"):
        torch.ops.dsv3.mla_attend(q, cache, slots + 400, None, C, 0.1)


def test_ops_run_their_reference_where_no_native_kernel_is_registered():
    """The reference kernels are the ops' CompositeExplicitAutograd kernels: meta tensors get shapes (fake)."""
    x = torch.empty(3, 64, device="meta")
    w = torch.empty(48, 64, device="meta")
    assert torch.ops.dsv3.linear(x, w, None, None, 0, 0).shape == (3, 48)
    assert torch.ops.dsv3.rms_norm(x, torch.empty(64, device="meta"), 1e-6).shape == (3, 64)


# ---- decode plans follow every change to the weights ---------------------------------------------------------

def _model(seed: int = 3, **over) -> DeepseekV3ForCausalLM:
    cfg = ModelConfig.from_dict({**TINY, "vocab_size": 97, "q_lora_rank": 32, **over})
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg)
    model.init_weights(std=0.2)
    return model


def _decode(model, steps: int = 4) -> torch.Tensor:
    from dsv3.attention import DenseLatentCache

    c = model.config
    cache = DenseLatentCache(c.num_hidden_layers, 1, 24, c.latent_dim, model.dtype)
    with torch.inference_mode():
        out = [model(torch.arange(3, 12)[None], ctx=cache)[:, -1]]
        for _ in range(steps):
            out.append(model(out[-1].argmax(-1, keepdim=True), ctx=cache)[:, -1])
    return torch.cat(out).float()


def _modules_path(monkeypatch, model) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(kernels, "load", lambda: False)
        return _decode(model)


def _plan_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer a whole-step plan reads, by name (the int4 layouts are derived, not listed)."""
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    return [(n, t) for n, t in named.items() if "mtp" not in n and "expert_load" not in n]


@native_only
@pytest.mark.parametrize("method", ["none", "int8", "int4"])
def test_plan_never_reads_stale_weights(monkeypatch, method):
    """Swap the storage of every tensor a plan reads (`.data = ...`) and replace tensors and modules the ways dsv3's
    operations do (`.to()`, quantizing, LoRA, merging): each whole step equals the module path right after."""
    monkeypatch.setattr(quant_kernels, "KERNEL_ACT_DTYPE", None)  # PyTorch's int8 kernel in fp32, as the native one
    model = _model(**({"n_routed_experts": 16, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 4}
                      if method == "int4" else {}))
    if method != "none":
        quantize_model(model, method, group_size=32, include_lm_head=True, progress=False)
    calls = {"n": 0}
    real = torch.ops.dsv3.decode_step
    monkeypatch.setattr(torch.ops.dsv3, "decode_step", lambda *a, **k: calls.update(n=calls["n"] + 1) or real(*a, **k))

    def check(what: str):
        calls["n"] = 0
        fast = _decode(model)
        assert calls["n"] == 4, what  # every decode step was one native call
        torch.testing.assert_close(fast, _modules_path(monkeypatch, model), atol=2e-4, rtol=2e-4, msg=what)
        return fast

    before = check("fresh")
    g = torch.Generator().manual_seed(0)
    for name, t in _plan_tensors(model):
        with torch.no_grad():
            if t.is_floating_point():
                new = t.detach() * (1.0 + 0.5 * torch.rand(t.shape, generator=g)) if "norm" in name or "inv_freq" in name \
                    else torch.randn(t.shape, generator=g) * t.detach().float().std().clamp(min=1e-3) + t.detach().mean()
            else:
                new = torch.randint(0, 256 if t.dtype == torch.uint8 else 127, t.shape, generator=g).to(t.dtype)
            t.data = new.to(t.dtype).contiguous()  # new storage, same tensor object
        if name.endswith((".packed", "_packed", ".scale_zeros", "_scale_zeros")):
            ops.invalidate(model)  # int4: the plan reads layouts derived from these; a documented rebuild
        check(f"after swapping {name}")
    after = _decode(model)
    assert not torch.equal(before, after)

    model.to(torch.float32)  # `.to()` hands back new buffers: the model invalidates its plans itself
    check(".to()")
    if method == "none":
        quantize_model(model, "int8", include_lm_head=True, progress=False)  # replaces modules
        check("quantized in place")


@native_only
def test_lora_wrapping_and_merging_replan(monkeypatch):
    from dsv3.lora import LoRASpec, inject_lora, unload

    model = _model()
    base = _decode(model)
    inject_lora(model, LoRASpec(r=4, lora_alpha=8, target_modules=["q_b_proj", "o_proj", "gate_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    adapted = _decode(model)  # LoRA layers have no native form: per-module path
    torch.testing.assert_close(adapted, _modules_path(monkeypatch, model), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(adapted, base)
    unload(model, merge=True)  # back to plain linears, adapters folded in: a native plan again, of the merged weights
    calls = {"n": 0}
    real = torch.ops.dsv3.decode_step
    monkeypatch.setattr(torch.ops.dsv3, "decode_step", lambda *a, **k: calls.update(n=calls["n"] + 1) or real(*a, **k))
    merged = _decode(model)
    assert calls["n"] == 4
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)


# ---- the build: key, targets and fallbacks -------------------------------------------------------------------

@native_only
def test_cache_key_follows_cpu_features_and_a_foreign_key_is_never_loaded(monkeypatch, tmp_path):
    """A cache shared with a machine of other CPU features holds its library under another key: this machine
    builds its own instead of loading that one (an AVX-512 build on an AVX2 host is SIGILL)."""
    cc, cxx = kernels.compilers()
    here = kernels.cpu_features()
    avx2_only = frozenset(f for f in here if not f.startswith("avx512")) | {"avx2", "fma"}
    flags = ("-O3",)
    assert kernels.build_key(cc, cxx, flags, here) != kernels.build_key(cc, cxx, flags, avx2_only)
    assert kernels.target(avx2_only).flags == ("-march=native",)
    monkeypatch.setenv("DSV3_CACHE", str(tmp_path))
    built = []

    def fake_compile(cc, cxx, flags, so):
        built.append(so)
        so.parent.mkdir(parents=True, exist_ok=True)
        so.write_bytes(b"")
        return None
    monkeypatch.setattr(kernels, "compile_library", fake_compile)
    foreign = kernels.locate()  # as the AVX-512 machine would: built and cached under its key
    monkeypatch.setattr(kernels, "cpu_features", lambda: avx2_only)
    mine = kernels.locate()  # this "AVX2 host" does not find it: it builds its own
    assert len(built) == 2 and foreign != mine and mine == built[1]


@pytest.mark.parametrize("arch, features, want", [
    ("x86_64", {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma"}, ("x86-64 AVX-512", ("-march=native", "-mprefer-vector-width=512"))),
    ("x86_64", {"avx2", "fma"}, ("x86-64 AVX2", ("-march=native",))),
    ("AMD64", set(), ("x86-64", ("-march=native",))),
    ("aarch64", {"asimd"}, ("aarch64 NEON", ("-mcpu=native",))),
    ("arm64", set(), ("aarch64 NEON", ("-mcpu=native",))),
    ("riscv64", set(), ("riscv64", ())),
    ("", set(), ("unknown", ())),
])
def test_build_flags_per_architecture(monkeypatch, arch, features, want):
    """x86-only flags never reach another ISA (an aarch64 build given -mprefer-vector-width fails), an unknown
    machine builds the portable code, and the flags are part of the cache key."""
    monkeypatch.setattr(kernels.platform, "machine", lambda: arch)
    t = kernels.target(frozenset(features))
    assert (t.name, t.flags) == want
    if t.flags:
        assert kernels.build_key("cc", "c++", t.flags, frozenset(features)) != kernels.build_key("cc", "c++", (), frozenset(features))


@pytest.mark.parametrize("case", ["no compiler", "failed build", "unsupported os", "switched off"])
def test_without_native_kernels_the_ops_fall_back_with_one_log_line(tmp_path, case):
    """No compiler, a build that fails, an unsupported OS or DSV3_KERNELS=0: one warning line, then the same
    decode as PyTorch computes it."""
    code = (
        "import sys, logging, io; sys.path.insert(0, 'tests')\n"
        "buf = io.StringIO(); logging.basicConfig(stream=buf, level=logging.WARNING)\n"
        "import torch, test_ops as t\nfrom dsv3 import kernels, ops\n"
        + ("sys.platform = 'win32'  # as Windows reports itself, once torch is in\n" if case == "unsupported os" else "")
        + ""
        "out = t._decode(t._model())\n"
        "assert not kernels.load() and ops.backend('cpu') == 'torch'\n"
        "lines = [l for l in buf.getvalue().splitlines() if 'native CPU kernels unavailable' in l]\n"
        "assert len(lines) == 1, buf.getvalue()\n"
        "print(lines[0]); print(float(out.abs().sum()))\n")
    env = {**os.environ, "DSV3_CACHE": str(tmp_path)}
    env.pop("DSV3_KERNELS_PREBUILT", None)
    if case == "no compiler":
        env.update(CC="/nonexistent/cc", CXX="/nonexistent/c++", PATH="/nonexistent")
    elif case == "failed build":
        env["DSV3_KERNELS_CFLAGS"] = "-fno-such-flag-exists"
    elif case == "switched off":
        env["DSV3_KERNELS"] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    line, total = out.stdout.strip().splitlines()
    expect = {"no compiler": "no C and C++ compiler", "failed build": "failed", "unsupported os": "not supported",
              "switched off": "DSV3_KERNELS=0"}[case]
    assert expect in line
    assert abs(float(total) - float(_decode(_model()).abs().sum())) < 1e-2  # the same numbers as here
