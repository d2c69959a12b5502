"""Pre-quantized int4 checkpoints as AutoAWQ (GEMM), GPTQ and compressed-tensors (pack-quantized) write them.

Each checkpoint is written in-test by a small packer that follows the format's documented layout (AutoAWQ's
`WQLinear_GEMM` interleaved nibble order, GPTQ's K-packed qweight and minus-one zero points, compressed-tensors'
`pack_to_int32` with signed values shifted by 8), and the packer is itself checked by an independent
bit-by-bit decoder. The oracle for loading is the same network with each packed matrix replaced by its
dequantized values, (q − z)·s: dsv3 must load the packed files onto its int4 kernels (no dense copy) and
produce those logits.
"""

import json

import pytest
import torch

from dsv3.errors import DSV3Error
from dsv3.io.load import load_for_inference, load_model
from dsv3.quant import kernels as kn
from dsv3.quant.experts import QuantExperts
from dsv3.quant.linear import QuantLinear
from dsv3.quant.schemes import QuantError
from tiny_model import make_tiny_model_dir

WIDTHS = dict(q_lora_rank=32, moe_intermediate_size=64)  # every matrix K a multiple of 32 (experts: 64) and N of 8
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def rtn(w: torch.Tensor, g: int, sym: bool):
    """Round-to-nearest int4 per (row, group): u in 0..15, scale, zero (8 when symmetric)."""
    grp = w.float().unflatten(-1, (-1, g))
    if sym:
        s = (grp.abs().amax(-1) / 7).clamp(min=1e-5)
        z = torch.full_like(s, 8)
    else:
        lo, hi = grp.amin(-1), grp.amax(-1)
        s = ((hi - lo) / 15).clamp(min=1e-5)
        z = (-torch.round(lo / s)).clamp(0, 15)
    u = (torch.round(grp / s[..., None]) + z[..., None]).clamp(0, 15)
    return u.flatten(-2).to(torch.int64), s, z.to(torch.int64)


def words(vals: torch.Tensor) -> torch.Tensor:
    """[..., 8] nibbles -> int32 words, nibble i at bits 4i."""
    out = torch.zeros(vals.shape[:-1], dtype=torch.int64)
    for i in range(8):
        out |= vals[..., i].to(torch.int64) << (4 * i)
    return out.to(torch.int32) if out.max() < 2**31 else (out - (out >= 2**31).long() * 2**32).to(torch.int32)


def pack_awq(u, s, z):
    """AutoAWQ GEMM: qweight [K, N/8], qzeros [K/g, N/8] (8 output columns per word, order 0 2 4 6 1 3 5 7), scales [K/g, N]."""
    iw, iz = u.t(), z.t()
    def pk(m):
        return words(torch.stack([m[:, i::8] for i in ORDER], -1).reshape(m.shape[0], -1, 8))
    return {"qweight": pk(iw), "qzeros": pk(iz), "scales": s.t().half().contiguous()}


def pack_gptq(u, s, z, g, v2=False):
    """GPTQ: qweight [K/8, N] (8 input rows per word), qzeros [K/g, N/8] holding z − 1 (v1), scales, g_idx."""
    iw = u.t()
    qw = words(torch.stack([iw[i::8] for i in range(8)], -1))
    zz = z.t() - (0 if v2 else 1)
    qz = words(torch.stack([zz[:, i::8] for i in range(8)], -1))
    K = u.shape[1]
    return {"qweight": qw, "qzeros": qz, "scales": s.t().half().contiguous(), "g_idx": (torch.arange(K) // g).int()}


def pack_ct(u, s, z, sym):
    """compressed-tensors pack_to_int32: signed q + 8 packed along K; zero points (asym) packed along N."""
    out = {"weight_packed": words(torch.stack([u[:, i::8] for i in range(8)], -1)), "weight_scale": s.bfloat16(),
           "weight_shape": torch.tensor(list(u.shape), dtype=torch.int32)}
    if not sym:
        out["weight_zero_point"] = words(torch.stack([z[i::8] for i in range(8)], -1))
    return out


def decode(word: int, i: int) -> int:
    return (int(word) >> (4 * i)) & 15


def test_packers_follow_the_documented_layouts():
    """The packers, read back bit by bit with the formats' own indexing rules."""
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    u, s, z = rtn(w, 32, sym=False)
    a = pack_awq(u, s, z)
    for k, n in [(0, 0), (5, 9), (63, 15), (33, 4)]:
        c, pos = divmod(n, 8)
        assert decode(a["qweight"][k, c], ORDER.index(pos)) == u[n, k]
        assert decode(a["qzeros"][k // 32, c], ORDER.index(pos)) == z[n, k // 32]
    g = pack_gptq(u, s, z, 32)
    for k, n in [(0, 0), (13, 7), (63, 15)]:
        assert decode(g["qweight"][k // 8, n], k % 8) == u[n, k]
        assert decode(g["qzeros"][k // 32, n // 8], n % 8) == z[n, k // 32] - 1
    c = pack_ct(u, s, z, sym=False)
    for k, n in [(0, 0), (13, 7), (63, 15)]:
        assert decode(c["weight_packed"][n, k // 8], k % 8) == u[n, k]
        assert decode(c["weight_zero_point"][n // 8, k // 32], n % 8) == z[n, k // 32]


def quantizable(name: str, t: torch.Tensor, only_experts: bool) -> bool:
    if t.dim() != 2 or not name.startswith("model.layers.") or not name.endswith(".weight") or ".mlp.gate." in name:
        return False
    if "embed_tokens" in name or "shared_head" in name or "norm" in name:
        return False
    return ".mlp.experts." in name if only_experts else True


def write_packed(src, dst, method: str, g: int, sym: bool, model_type: str | None = None):
    """`src` re-written as `method` files (bf16 dense rest); returns {checkpoint weight name: dequantized fp32 weight}."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors, out, deq = load_file(str(src / "model.safetensors")), {}, {}
    for name, t in tensors.items():
        if not quantizable(name, t, only_experts=method == "compressed-tensors") or t.shape[1] % g:  # left dense, as
            # AutoAWQ's modules_to_not_convert / compressed-tensors' ignore leave a module
            out[name] = t.bfloat16() if t.dim() >= 2 and ".mlp.gate." not in name else t
            continue
        u, s, z = rtn(t, g, sym)
        prefix = name.removesuffix(".weight")
        if method == "awq":
            packed = pack_awq(u, s, z)
            s = packed["scales"].float().t()
        elif method == "gptq":
            packed = pack_gptq(u, s, z, g)
            s = packed["scales"].float().t()
        else:
            packed = pack_ct(u, s, z, sym)
            s = packed["weight_scale"].float()
        out.update({f"{prefix}.{k}": v for k, v in packed.items()})
        deq[name] = ((u.float() - z.float().repeat_interleave(g, 1)) * s.repeat_interleave(g, 1))
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    if model_type:
        cfg["model_type"] = model_type
    cfg["quantization_config"] = {
        "awq": {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": g, "zero_point": True,
                "modules_to_not_convert": ["lm_head"]},
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": g, "sym": sym, "desc_act": False, "checkpoint_format": "gptq"},
        "compressed-tensors": {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                               "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                                             "weights": {"num_bits": 4, "type": "int", "symmetric": sym,
                                                                         "strategy": "group", "group_size": g, "actorder": None}}},
                               "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|down)_proj.*"]},
    }[method]
    (dst / "config.json").write_text(json.dumps(cfg))
    return deq


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("foreign"), **WIDTHS)


def oracle(src, packed_dir, deq):
    """The network of `packed_dir` with every packed matrix dense at its dequantized value."""
    from safetensors.torch import load_file, save_file

    ref_dir = packed_dir.parent / (packed_dir.name + "-ref")
    ref_dir.mkdir()
    for f in packed_dir.iterdir():
        if f.name != "model.safetensors":
            (ref_dir / f.name).write_bytes(f.read_bytes())
    t = load_file(str(src / "model.safetensors"))
    t = {n: (deq[n] if n in deq else v.bfloat16().float() if v.dim() >= 2 and ".mlp.gate." not in n else v) for n, v in t.items()}
    save_file(t, str(ref_dir / "model.safetensors"))
    cfg = json.loads((ref_dir / "config.json").read_text())
    cfg.pop("quantization_config")
    (ref_dir / "config.json").write_text(json.dumps(cfg))
    return load_model(ref_dir, progress=False)


@pytest.mark.parametrize("method,g,sym,model_type", [
    ("awq", 32, False, None),
    ("gptq", 32, True, None),
    ("gptq", 64, False, None),
    ("compressed-tensors", 32, True, "kimi_k2"),  # Kimi-K2-Thinking: routed experts int4, symmetric, groups of 32
    ("compressed-tensors", 32, False, None),
])
@torch.no_grad()
def test_foreign_int4_checkpoint_loads_packed_and_matches_its_dequantized_network(base, tmp_path, monkeypatch, method, g, sym, model_type):
    monkeypatch.setattr(kn, "KERNEL_ACT_DTYPE", None)  # fp32 activations into the int4 kernel: compare to 1e-4
    out = tmp_path / method
    deq = write_packed(base, out, method, g, sym, model_type)
    model = load_model(out, progress=False)
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, QuantExperts) and experts.fmt.name == "int4" and experts.fmt.tensor_group(experts.proj("down_proj")) == g
    attn = model.model.layers[0].self_attn.o_proj
    assert isinstance(attn, QuantLinear) == (method != "compressed-tensors")
    assert not isinstance(model.lm_head, QuantLinear)
    ref = oracle(base, out, deq)
    ids = torch.randint(3, 200, (2, 24))
    torch.testing.assert_close(model(ids), ref(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qc,needle", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes' is not supported"),
    ({"quant_method": "awq", "version": "gemv", "bits": 4, "group_size": 32}, "AWQ version 'gemv'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True}, "desc_act"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 32}, "3 bits"),
    ({"quant_method": "awq", "bits": 4, "group_size": 48}, "group size 48"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized"}, "format 'float-quantized'"),
])
def test_other_methods_are_refused_by_name(base, tmp_path, qc, needle):
    out = tmp_path / "other"
    out.mkdir()
    for f in base.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantError, match=needle) as e:
        load_model(out, progress=False)
    assert "\n" not in str(e.value) and "does config.json match" not in str(e.value)


def test_act_order_g_idx_is_refused(base, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "gptq"
    write_packed(base, out, "gptq", 32, True)
    t = load_file(str(out / "model.safetensors"))
    t["model.layers.0.self_attn.o_proj.g_idx"] = t["model.layers.0.self_attn.o_proj.g_idx"].flip(0).contiguous()
    save_file(t, str(out / "model.safetensors"))
    with pytest.raises(QuantError, match=r"o_proj\.g_idx is not in order: act-order"):
        load_model(out, progress=False)


def test_quantization_awq_flag_checks_the_files(base, tmp_path):
    """`--quantization awq` (as vLLM users type it) loads AutoAWQ files as they are, and names the command that makes
    an AWQ checkpoint when the files are something else."""
    out = tmp_path / "awq"
    write_packed(base, out, "awq", 32, False)
    model = load_for_inference(out, quantization="awq")
    assert isinstance(model.model.layers[0].self_attn.o_proj, QuantLinear)
    with pytest.raises(DSV3Error, match=r"not a awq checkpoint \(it holds full-precision weights\); make one with "
                                        r"`dsv3 quantize --method awq"):
        load_for_inference(base, quantization="awq")
    with pytest.raises(DSV3Error, match="not a gptq checkpoint"):
        load_for_inference(out, quantization="gptq")
