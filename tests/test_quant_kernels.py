"""Quantized formats against independent float64 oracles: packing, linears, experts, FP8 blocks."""

import pytest
import torch
from torch import nn

from dsv3.io.checkpoint import dequantize_fp8
from dsv3.config import ModelConfig
from dsv3.layers.moe import Experts
from dsv3.quant import kernels as kn
from dsv3.quant.experts import QuantExperts
from dsv3.quant.formats import make_format
from dsv3.quant.linear import QuantLinear
from dsv3.quant.schemes import (QuantError, check_group_size, dequantize_fp8_block, effective_group, pack_nibbles,
                                quantize_fp8_block, quantize_int4, quantize_int8, unpack_nibbles)


def oracle_int4(w, g, zero_point):
    """(u − z)·s per group, written out with loops over groups in float64 (independent of the code under test)."""
    N, K = w.shape
    Kp = -(-K // g) * g
    wp = torch.zeros(N, Kp, dtype=torch.float64)
    wp[:, :K] = w.double()
    out = torch.empty_like(wp)
    for j in range(Kp // g):
        blk = wp[:, j * g:(j + 1) * g]
        if zero_point:
            lo, hi = blk.min(1).values, blk.max(1).values
            s = (hi - lo).clamp(min=1e-5) / 15
            z = (-lo / s).round().clamp(0, 15)
        else:
            s = blk.abs().max(1).values.clamp(min=1e-5) / 7
            z = torch.full_like(s, 8.0)
        u = (blk / s[:, None]).round().add(z[:, None]).clamp(0, 15)
        out[:, j * g:(j + 1) * g] = (u - z[:, None]) * s[:, None]
    return out[:, :K]


def test_nibble_pack_roundtrip_exact():
    u = torch.randint(0, 16, (5, 3, 64), dtype=torch.uint8)
    p = pack_nibbles(u)
    assert p.shape == (5, 3, 32) and p.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(p), u)
    assert int(p[0, 0, 0]) == int(u[0, 0, 0]) | (int(u[0, 0, 1]) << 4)  # low nibble = even column


@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("N,K,g", [(48, 256, 128), (40, 72, 32), (24, 64, 64)])
def test_int4_quantizer_matches_oracle(N, K, g, zero_point):
    w = torch.randn(N, K) * torch.linspace(0.1, 3, K)
    u, s, z = quantize_int4(w, g, zero_point)
    fmt = make_format("int4", g, zero_point)
    lin = QuantLinear(fmt, K, N, fmt.quantize(w))
    torch.testing.assert_close(lin.dense_weight().double(), oracle_int4(w, g, zero_point), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel_act", [None, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt_name", ["int8", "int4", "fp8"])
def test_quant_linear_equals_dequantized_matmul(fmt_name, dtype, kernel_act, monkeypatch):
    """Kernels in the input dtype match the dequantized-weight matmul to fp32 rounding; the default
    bf16-activation kernel path to bf16 rounding (2^-8 relative)."""
    monkeypatch.setattr(kn, "KERNEL_ACT_DTYPE", kernel_act)
    torch.manual_seed(0)
    N, K = 72, 96  # N is not a multiple of the int4 kernel's 16 rows, K not of the group (64)
    w = torch.randn(N, K)
    fmt = make_format(fmt_name, group_size=64)
    lin = QuantLinear.from_linear(_linear(w, dtype), fmt)
    x = torch.randn(3, 5, K).to(dtype)
    ref = (x.double() @ lin.fmt.dequant(lin.tensors, N, K).double().T)
    y = lin(x)
    assert y.shape == (3, 5, N) and y.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 and (kernel_act is None or fmt_name == "fp8") else 3e-2
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def _linear(w, dtype):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w.to(dtype)
    return lin


def test_int8_matches_independent_formula_and_error_bound():
    w = torch.randn(33, 70)
    q, s = quantize_int8(w)
    lin = QuantLinear(make_format("int8"), 70, 33, {"qweight": q, "scale": s})
    oracle = q.double() * (w.double().abs().max(1).values / 127)[:, None]
    torch.testing.assert_close(lin.dense_weight().double(), oracle, rtol=1e-6, atol=1e-7)
    assert ((lin.dense_weight() - w).abs() <= s[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("fmt_name,kw", [("int8", {}), ("int4", {"group_size": 32}), ("int4", {"group_size": 32, "zero_point": False}), ("fp8", {})])
def test_checkpoint_tensors_roundtrip_exact(fmt_name, kw):
    """export -> load -> export is bit-exact (int4 goes through the CPU kernel's blocked layout and back)."""
    fmt = make_format(fmt_name, **kw)
    w = torch.randn(40, 100)
    lin = QuantLinear(fmt, 100, 40, fmt.quantize(w))
    exported = lin.export()
    again = QuantLinear(fmt, 100, 40, fmt.load(exported, 40, 100, "x")).export()
    assert exported.keys() == again.keys() == set(fmt.ckpt_keys)
    for k in exported:
        assert torch.equal(exported[k].view(torch.uint8) if exported[k].dtype == torch.float8_e4m3fn else exported[k],
                           again[k].view(torch.uint8) if again[k].dtype == torch.float8_e4m3fn else again[k]), k
    if fmt_name == "int4":
        assert exported["weight_packed"].shape == (40, 64)  # two values per byte, K padded 100 -> 128


def test_fp8_block_roundtrip_against_reference():
    torch.manual_seed(1)
    w = torch.randn(300, 200) * 3
    q, sinv = quantize_fp8_block(w)
    assert q.dtype == torch.float8_e4m3fn and sinv.shape == (3, 2)
    ref = torch.empty(300, 200, dtype=torch.float32)
    for i in range(3):
        for j in range(2):
            blk = (slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128))
            ref[blk] = q[blk].float() * sinv[i, j]
    assert torch.equal(dequantize_fp8_block(q, sinv), ref)  # exact: one fp32 product per element
    assert torch.equal(dequantize_fp8(q, sinv, (128, 128), "w"), dequantize_fp8_block(q, sinv))
    assert ((dequantize_fp8_block(q, sinv) - w).abs() <= w.abs() * 2**-4 + float(sinv.max()) * 2**-9).all()


def _experts(E=6, D=64, Im=48):
    cfg = ModelConfig.from_dict(dict(model_type="deepseek_v3", vocab_size=10, hidden_size=D, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
                                     qk_rope_head_dim=8, v_head_dim=8, moe_intermediate_size=Im, n_routed_experts=E,
                                     num_experts_per_tok=2))
    ex = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
    torch.manual_seed(2)
    ex.gate_up_proj.data.normal_(0, 0.2)
    ex.down_proj.data.normal_(0, 0.2)
    return ex.requires_grad_(False)


@pytest.mark.parametrize("fmt_name", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("n_tokens", [1, 5, 200])
def test_quant_experts_equal_dense_experts_on_dequantized_weights(fmt_name, n_tokens, monkeypatch):
    """Both execution paths (loop over active experts, grouped) against `Experts` on dequantized weights;
    experts 4 and 5 receive no tokens. Kernels run in the input dtype here (fp32-exact comparison)."""
    monkeypatch.setattr(kn, "KERNEL_ACT_DTYPE", None)
    ex = _experts()
    q = QuantExperts.from_experts(ex, make_format(fmt_name, group_size=32))
    oracle = _experts()
    Im = q.inter
    oracle.gate_up_proj.data = torch.cat([q.fmt.dequant(q.proj("gate_proj"), Im, 64), q.fmt.dequant(q.proj("up_proj"), Im, 64)], 1)
    oracle.down_proj.data = q.fmt.dequant(q.proj("down_proj"), 64, Im)
    x = torch.randn(n_tokens, 64)
    idx = torch.stack([torch.randint(0, 4, (n_tokens,)), torch.randint(0, 4, (n_tokens,))], 1)
    idx[:, 1] = (idx[:, 0] + 1) % 4
    w = torch.rand(n_tokens, 2)
    torch.testing.assert_close(q(x, idx, w), oracle(x, idx, w), rtol=1e-4, atol=1e-4)


def test_bad_group_size_is_a_user_error():
    with pytest.raises(QuantError, match="group size 100"):
        check_group_size(100)


@pytest.mark.parametrize("K,g,want", [(64, 128, 64), (96, 128, 32), (192, 128, 64), (768, 128, 128), (128, 256, 128),
                                      (200, 128, 128), (72, 32, 32), (512, 64, 64)])
def test_effective_group_is_the_largest_accepted_divisor(K, g, want):
    assert effective_group(K, g) == want


@pytest.mark.parametrize("N,K,g", [(32, 64, 64), (48, 96, 32)])
def test_narrow_inputs_get_a_smaller_group_instead_of_padding(N, K, g, monkeypatch):
    """Group 128 asked, K = 64 or 96 wide: groups of 64 / 32 and no zero-padded columns, values as the oracle's at
    that group, and the packed kernel multiplies by them; the checkpoint's recorded group loads exactly, and
    loading it as a 128-group names the tensor."""
    monkeypatch.setattr(kn, "KERNEL_ACT_DTYPE", None)  # fp32 activations: the kernel's sums are near exact
    torch.manual_seed(0)
    w = torch.randn(N, K) * torch.linspace(0.1, 3, K)
    fmt = make_format("int4", 128)
    t = fmt.quantize(w)
    lin = QuantLinear(fmt, K, N, t)
    assert t["packed"].shape[-1] * 2 == K and fmt.tensor_group(t) == g
    torch.testing.assert_close(lin.dense_weight().double(), oracle_int4(w, g, True), rtol=1e-5, atol=1e-6)
    x = torch.randn(5, K)
    torch.testing.assert_close(lin(x).double(), x.double() @ oracle_int4(w, g, True).T, rtol=1e-4, atol=1e-4)
    ex = lin.export()
    assert ex["weight_packed"].shape == (N, K // 2) and ex["weight_scale"].shape == (N, K // g)
    name = "model.layers.1.mlp.experts.3.down_proj"
    loader = make_format("int4", 128, group_sizes={"model.layers.1.mlp.experts.*.down_proj": g})
    assert torch.equal(QuantLinear(loader, K, N, loader.load(ex, N, K, name)).dense_weight(), lin.dense_weight())
    with pytest.raises(QuantError, match=r"model\.layers\.1\.mlp\.shared_experts\.down_proj\.weight_packed"):
        loader.load(ex, N, K, "model.layers.1.mlp.shared_experts.down_proj")


def test_bad_recorded_group_is_named():
    with pytest.raises(QuantError, match=r"group_sizes\['model\.layers\.0\.self_attn\.q_b_proj'\] is 48"):
        make_format("int4", 128, group_sizes={"model.layers.0.self_attn.q_b_proj": 48})


def test_load_rejects_wrong_shape_naming_the_tensor():
    fmt = make_format("int4", group_size=32)
    t = QuantLinear(fmt, 64, 32, fmt.quantize(torch.randn(32, 64))).export()
    t["weight_scale"] = t["weight_scale"][:, :1]
    with pytest.raises(QuantError, match=r"model\.layers\.0\.mlp\.up_proj\.weight_scale"):
        fmt.load(t, 32, 64, "model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("K", [24, 40, 8])
def test_int8_widths_the_kernel_mishandles_fall_back_correctly(K):
    """torch 2.13's bf16 int8 kernel is wrong for K % 16 != 0 (q_b_proj has K = q_lora_rank)."""
    fmt = make_format("int8")
    lin = QuantLinear(fmt, K, 32, fmt.quantize(torch.randn(32, K)))
    x = torch.randn(3, K)
    ref = x.double() @ lin.dense_weight().double().T
    torch.testing.assert_close(lin(x).double(), ref, rtol=1e-4, atol=1e-4)


def test_fp8_block_view_path_matches_expanded_scales():
    """Block-aligned (stacked) weights take the broadcast path; it must equal the expanded-scale product."""
    w = torch.randn(2, 256, 384)
    parts = [quantize_fp8_block(m) for m in w]
    q, s = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    ref = torch.stack([p[0].float() * p[1].repeat_interleave(128, 0).repeat_interleave(128, 1) for p in parts])
    assert torch.equal(dequantize_fp8_block(q, s), ref)


def test_int8_prefill_rows_are_exact():
    """From DEQUANT_MIN_ROWS fp32 rows the int8 weight is dequantized for one fp32 GEMM: no bf16
    rounding of the activations (the default kernel path's), so prompt scoring sees the weights' error only."""
    torch.manual_seed(0)
    fmt = make_format("int8")
    lin = QuantLinear(fmt, 96, 40, fmt.quantize(torch.randn(40, 96)))
    ref_w = lin.dense_weight().double()
    x = torch.randn(kn.DEQUANT_MIN_ROWS, 96)
    torch.testing.assert_close(lin(x).double(), x.double() @ ref_w.T, rtol=1e-5, atol=1e-5)
    few = x[: kn.DEQUANT_MIN_ROWS - 1]
    assert (lin(few).double() - few.double() @ ref_w.T).abs().max() > 1e-4  # below it: the bf16-activation kernel
