"""Model-level quantization: logits vs fp32, save/load/generate round trips, corrupt checkpoints, AWQ.

The tiny model is `make_tiny_model_dir`'s, with matrices scaled by 1/4 (its std-0.2 init makes every
perturbation explode through the layers) and four outlier channels (×12) in each pre-norm — the
activation outliers AWQ exists for. Quality is measured by mean KL(fp32 ‖ quantized) of the
next-token distributions: on a random model, argmaxes sit near ties, so max |Δlogit| says little.
"""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from dsv3.io.load import load_model
from dsv3.io.checkpoint import save_model
from dsv3.config import ModelConfig
from dsv3.models.deepseek_v3 import DeepseekV3ForCausalLM
from dsv3.io.paths import default_model_dir
from reference_decoder import Generator
from dsv3.quant import QuantError, load_quantized, quantize_model, save_quantized
from dsv3.quant.apply import default_policy, linear_weight_bytes
from dsv3.quant.awq import _Search, awq_calibrate
from dsv3.quant.experts import QuantExperts
from dsv3.quant.linear import QuantLinear
from dsv3.quant.schemes import pseudo_quantize_int4
from dsv3.io.safetensors import SafetensorsFile
from dsv3.engine.sampling import SamplingParams
from dsv3.io.tokenizer import Tokenizer
from tiny_model import make_tiny_model_dir

G = 32  # group size for the tiny widths (64, 24, 32, 96)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = make_tiny_model_dir(tmp_path_factory.mktemp("qmodel"))
    m = load_model(d, progress=False)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() >= 2 and "embed" not in n and not n.endswith("mlp.gate.weight"):
                p.mul_(0.25)
        for blk in list(m.model.layers) + [mtp.block for mtp in m.model.mtp]:
            blk.input_layernorm.weight[:4] = 12.0
            blk.post_attention_layernorm.weight[:4] = 12.0
    save_model(m, d)
    return d


def kl(ref, out):
    return F.kl_div(out.float().log_softmax(-1), ref.float().log_softmax(-1), log_target=True, reduction="none").sum(-1).mean().item()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 200, (8, 32), generator=g), torch.randint(3, 200, (4, 32), generator=g)


# Measured on this model: int8 ≈ 1e-3, fp8 ≈ 2.3e-3, int4 RTN ≈ 9e-3; bounds leave ~3x headroom and
# still fail for a broken scheme (an unquantized-vs-random model gives KL ≈ 1).
KL_BOUND = {"int8": 0.004, "fp8": 0.008, "int4": 0.03}


@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
@torch.no_grad()
def test_logits_close_to_fp32_and_packed_modules_used(model_dir, data, method):
    _, held = data
    model = load_model(model_dir, progress=False)
    ref = model(held)
    dense_bytes = linear_weight_bytes(model)
    quantize_model(model, method, group_size=G, progress=False)
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.startswith("model.layers."))
    assert sum(isinstance(m, QuantExperts) for m in model.modules()) == 2  # layer 1 and the MTP block
    assert model.lm_head.weight.dtype == torch.float32 and model.model.layers[1].mlp.gate.weight.dtype == torch.float32
    ratio = linear_weight_bytes(model) / dense_bytes
    # vs fp32 bytes: 1/4 (int8, fp8) or 1/8 (int4) plus scales, which weigh a lot at these tiny widths (K = 24..96)
    assert ratio < {"int8": 0.28, "fp8": 0.27, "int4": 0.2}[method]
    assert kl(ref, model(held)) < KL_BOUND[method]


@pytest.mark.parametrize("method", ["int8", "int4", "awq", "fp8"])
@torch.no_grad()
def test_quantize_save_load_generate_roundtrip(model_dir, data, tmp_path, method):
    """`dsv3 quantize`'s defaults (LM head and embedding quantized, the rest of the dense tensors in bf16 or fp32
    norms): what was measured in memory is what loads back, bit for bit."""
    calib, held = data
    model = load_model(model_dir, progress=False)
    head, embedding = default_policy(method)
    if method == "fp8":
        with torch.no_grad():  # DeepSeek's FP8 layout keeps the embedding in bf16: round it as the file will
            model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight.bfloat16().float())
    quantize_model(model, method, group_size=G, calib=calib if method == "awq" else None, progress=False,
                   include_lm_head=head, embedding=embedding or False)
    out = save_quantized(model, tmp_path / method, tokenizer_from=model_dir)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == ("fp8" if method == "fp8" else "dsv3")
    with SafetensorsFile(out / "model.safetensors") as sf:
        dense = {n: sf.dtype(n) for n in sf.keys() if sf.dtype(n).is_floating_point and len(sf.shape(n)) >= 2
                 and not n.endswith(("weight_scale", "weight_scale_inv")) and sf.dtype(n) != torch.float8_e4m3fn}
    router = {n for n in dense if ".mlp.gate." in n}
    assert all(dense[n] == torch.float32 for n in router) and router
    assert {dense[n] for n in set(dense) - router} <= {torch.bfloat16}  # fp8's embedding; nothing else is dense
    loaded = load_quantized(out, progress=False)
    assert torch.equal(loaded(held), model(held))  # the packed tensors come back bit-exact
    tok = Tokenizer.from_dir(out)
    prompt = tok.encode("def add(a, b):")
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    a = Generator(model, tok).complete(prompt, params, index=0, seed=0)
    b = Generator(loaded, tok).complete(prompt, params, index=0, seed=0)
    assert a.token_ids == b.token_ids and len(b.token_ids) > 0


@pytest.mark.parametrize("lm_head", [False, True])
def test_fp8_checkpoint_in_official_layout_keeps_fp8(model_dir, tmp_path, lm_head):
    model = load_model(model_dir, progress=False)
    quantize_model(model, "fp8", include_lm_head=lm_head, progress=False)
    assert isinstance(model.lm_head, QuantLinear) == lm_head
    out = save_quantized(model, tmp_path / "fp8")
    with SafetensorsFile(out / "model.safetensors") as sf:
        assert sf.dtype("model.layers.0.self_attn.q_a_proj.weight") == torch.float8_e4m3fn
        assert sf.shape("model.layers.0.self_attn.q_a_proj.weight_scale_inv") == (1, 1)
        assert sf.dtype("model.layers.1.mlp.experts.3.down_proj.weight") == torch.float8_e4m3fn
    fp8 = load_quantized(out, progress=False)
    assert fp8.model.layers[1].mlp.experts.down_proj_qweight.dtype == torch.float8_e4m3fn
    dense = load_model(out, progress=False)  # the foundation loader dequantizes the same files
    ids = torch.randint(3, 200, (1, 16))
    torch.testing.assert_close(fp8(ids), dense(ids), rtol=1e-5, atol=1e-5)


def _quantized_dir(model_dir, tmp_path, method="int4"):
    model = load_model(model_dir, progress=False)
    quantize_model(model, method, group_size=G, progress=False)
    return save_quantized(model, tmp_path / "q", tokenizer_from=model_dir)


def _rewrite(path, fn):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_corrupt_tensor_is_named(model_dir, tmp_path):
    out = _quantized_dir(model_dir, tmp_path)
    _rewrite(out, lambda t: t.__setitem__("model.layers.1.mlp.experts.2.up_proj.weight_scale",
                                          t["model.layers.1.mlp.experts.2.up_proj.weight_scale"][:, :1].contiguous()))
    with pytest.raises(QuantError, match=r"model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight_scale"):
        load_quantized(out, progress=False)


def test_missing_tensor_is_named(model_dir, tmp_path):
    out = _quantized_dir(model_dir, tmp_path)
    _rewrite(out, lambda t: t.pop("model.layers.0.self_attn.o_proj.weight_zero_point"))
    with pytest.raises(QuantError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight_zero_point is missing"):
        load_quantized(out, progress=False)


def test_config_format_mismatch_is_named(model_dir, tmp_path):
    out = _quantized_dir(model_dir, tmp_path, "int8")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"].update(format="int4", bits=4, group_size=G, zero_point=True)
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantError, match=r"tensor model\.layers\.\d+\.\S+ "):
        load_quantized(out, progress=False)


@torch.no_grad()
def test_awq_scale_folding_preserves_the_float_model_and_routing(model_dir, data):
    calib, held = data
    model = load_model(model_dir, progress=False)
    ref = model(held)
    routes = {}
    for i, m in enumerate(model.modules()):
        if hasattr(m, "track_load"):
            m.track_load = True
    model(held)
    routes = [m.last_routing[1].sort(-1)[0].clone() for m in model.modules() if getattr(m, "last_routing", None) is not None]
    result = awq_calibrate(model, calib[:2], group_size=G, progress=False, clip=False, n_grid=5)
    torch.testing.assert_close(model(held), ref, rtol=1e-4, atol=1e-4)
    after = [m.last_routing[1].sort(-1)[0] for m in model.modules() if getattr(m, "last_routing", None) is not None]
    assert all(torch.equal(a, b) for a, b in zip(routes, after)) and routes
    assert model.model.layers[0].input_layernorm.weight[:4].max() < 12.0  # scales were folded in
    assert not result.forced_experts


@torch.no_grad()
def test_awq_beats_round_to_nearest_int4(model_dir, data):
    calib, held = data
    ref = load_model(model_dir, progress=False)
    r_calib, r_held = ref(calib), ref(held)
    rtn = load_model(model_dir, progress=False)
    quantize_model(rtn, "int4", group_size=G, progress=False)
    awq = load_model(model_dir, progress=False)
    quantize_model(awq, "awq", group_size=G, calib=calib, progress=False)
    assert kl(r_calib, awq(calib)) < 0.85 * kl(r_calib, rtn(calib))  # measured ≈ 0.74×
    assert kl(r_held, awq(held)) < kl(r_held, rtn(held))


@torch.no_grad()
def test_awq_expert_without_calibration_tokens(model_dir, data):
    """Expert 5 can never be routed to; it is calibrated on all tokens, reported, and still scaled."""
    calib, _ = data
    model = load_model(model_dir, progress=False)
    moe = model.model.layers[1].mlp
    moe.gate.e_score_correction_bias[5] = -1e4
    before = moe.experts.down_proj[5].clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_model(model, "awq", group_size=G, calib=calib, progress=False)
    assert model.awq_forced_experts == {"model.layers.1.mlp": [5]}
    assert any("no calibration tokens" in str(w.message) for w in caught)
    q = model.model.layers[1].mlp.experts
    down5 = q.fmt.dequant(q.proj("down_proj", 5), q.dim, q.inter)
    assert not torch.allclose(down5, before, atol=1e-3)  # quantized from scaled weights, not skipped
    assert torch.isfinite(model(calib[:1])).all()


def test_awq_without_calibration_is_a_user_error(model_dir):
    model = load_model(model_dir, progress=False)
    with pytest.raises(QuantError, match="--calib"):
        quantize_model(model, "awq", progress=False)
    with pytest.raises(QuantError, match="unknown quantization method 'int3'"):
        quantize_model(model, "int3", progress=False)


@torch.no_grad()
def test_quantized_lm_head_roundtrip_with_mtp(model_dir, data, tmp_path):
    """--lm-head: the head is packed too; MTP's copies of the embedding and head (never read on load) are not
    written; a kept embedding is stored in bf16."""
    _, held = data
    model = load_model(model_dir, progress=False)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight.bfloat16().float())
    quantize_model(model, "int8", include_lm_head=True, progress=False)
    assert isinstance(model.lm_head, QuantLinear)
    out = save_quantized(model, tmp_path / "head")
    with SafetensorsFile(out / "model.safetensors") as sf:
        assert sf.dtype("lm_head.weight") == torch.int8
        assert sf.dtype("model.embed_tokens.weight") == torch.bfloat16
        assert "model.layers.2.shared_head.head.weight" not in sf.entries and "model.layers.2.embed_tokens.weight" not in sf.entries
    loaded = load_quantized(out, progress=False)
    assert isinstance(loaded.lm_head, QuantLinear) and len(loaded.model.mtp) == 1
    assert torch.equal(loaded(held), model(held))


@torch.no_grad()
def test_int4_layers_with_an_int8_head_roundtrip(model_dir, data, tmp_path):
    """--lm-head int8 beside int4 layers (llama.cpp's Q4_K_M keeps its output matrix at 6 bits): recorded in
    config.json, restored on load; an unknown head format is refused by name."""
    _, held = data
    model = load_model(model_dir, progress=False)
    qc = quantize_model(model, "int4", group_size=32, include_lm_head="int8", embedding=True, progress=False)
    assert qc["lm_head"] == "int8" and model.lm_head.fmt.name == "int8" and qc["embed_tokens"] == "int4"
    assert model.model.layers[0].self_attn.o_proj.fmt.name == "int4"
    out = save_quantized(model, tmp_path / "mixed")
    with SafetensorsFile(out / "model.safetensors") as sf:
        assert sf.dtype("lm_head.weight") == torch.int8 and sf.dtype("model.embed_tokens.weight_packed") == torch.uint8
    loaded = load_quantized(out, progress=False)
    assert loaded.lm_head.fmt.name == "int8" and loaded.model.layers[0].self_attn.o_proj.fmt.name == "int4"
    assert torch.equal(loaded(held), model(held))
    with pytest.raises(QuantError, match="unknown LM head format 'int2'"):
        quantize_model(load_model(model_dir, progress=False), "int4", include_lm_head="int2", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["lm_head"] = "int3"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantError, match="lm_head is 'int3'"):
        load_quantized(out, progress=False)


@torch.no_grad()
def test_int4_on_default_model_shapes_meets_byte_budget_and_records_groups(tmp_path):
    """The embedded default model's shapes (random weights, so any future weights): with group 128 asked, q_b_proj
    (96 inputs) gets groups of 32 and kv_b_proj and the 64-wide expert down projections groups of 64 instead of a
    half-empty padded 128-group, so int4 linear bytes — packed nibbles plus fp32 scales and zero points, as held in
    memory — are ≤ 0.3× bf16. The checkpoint lists each such group and loads back to the same logits."""
    cfg = ModelConfig.from_dir(default_model_dir())
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg)
    model.init_weights()
    bf16 = linear_weight_bytes(model) / 2
    qc = quantize_model(model, "int4", group_size=128, progress=False)
    assert linear_weight_bytes(model) / bf16 <= 0.30
    L, groups = cfg.num_hidden_layers, qc["group_sizes"]
    assert groups["model.layers.0.self_attn.q_b_proj"] == 32 and groups["model.layers.0.self_attn.kv_b_proj"] == 64
    assert all(groups[f"model.layers.{i}.mlp.experts.*.down_proj"] == 64 for i in range(1, L + cfg.num_nextn_predict_layers))
    assert "model.layers.0.mlp.down_proj" not in groups and qc["group_size"] == 128
    ids = torch.randint(3, 1000, (1, 16))
    loaded = load_quantized(save_quantized(model, tmp_path / "int4", dtype="fp32"), progress=False)
    assert torch.equal(loaded(ids), model(ids))


def test_awq_scale_search_never_scores_worse_than_round_to_nearest():
    """AutoAWQ's grid s = x̄^α / w̄^(1−α) lacks s = 1; on inputs without salient channels its best point can be worse
    than plain rounding (2 of these 20 draws). The search includes s = 1, so its pick never loses to RTN."""
    torch.manual_seed(0)
    S = _Search(32, zero_point=True)
    for _ in range(20):
        x, w = torch.randn(256, 64), torch.randn(48, 64)
        ref = F.linear(x, w)
        s = S.scale(x, [w], lambda: F.linear(x, w))
        err_awq = (F.linear(x, pseudo_quantize_int4(w * s, 32) / s) - ref).pow(2).mean()
        err_rtn = (F.linear(x, pseudo_quantize_int4(w, 32)) - ref).pow(2).mean()
        assert err_awq <= err_rtn


@pytest.mark.parametrize("method", ["int8", "int4"])
@torch.no_grad()
def test_quantized_embedding_is_the_dequantized_table_and_a_tied_head_is_stored_once(tmp_path, method):
    """A tied model (the embedded default model's shape): quantizing embedding and head keeps the embedding a dense
    table holding exactly dequant(quant(E)) (checked against the scheme's own round trip), stores one matrix when
    head and embedding share their format (int8) and two otherwise (int4 body: int8 head, int4 embedding), and the
    directory loads back to the same logits."""
    from dsv3.quant.schemes import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8

    cfg = ModelConfig.from_dir(default_model_dir())
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg)
    model.init_weights()
    E = model.model.embed_tokens.weight.detach().clone()
    head, embedding = default_policy(method)
    qc = quantize_model(model, method, group_size=128, include_lm_head=head, embedding=embedding, progress=False)
    got = model.model.embed_tokens.weight
    if method == "int8":
        assert qc["embed_tokens"] == "lm_head"
        torch.testing.assert_close(got, dequantize_int8(*quantize_int8(E)), rtol=0, atol=1e-6)
    else:
        assert qc["embed_tokens"] == "int4" and qc["lm_head"] == "int8"
        u, s, z = quantize_int4(E, 128)
        torch.testing.assert_close(got, dequantize_int4(u, s, z, E.shape[1]), rtol=0, atol=1e-6)
    out = save_quantized(model, tmp_path / method)
    with SafetensorsFile(out / "model.safetensors") as sf:
        names = set(sf.keys())
    embed = {n for n in names if n.startswith("model.embed_tokens.")}
    assert embed == (set() if method == "int8" else {f"model.embed_tokens.{k}" for k in ("weight_packed", "weight_scale", "weight_zero_point")})
    assert "lm_head.weight" in names
    loaded = load_quantized(out, progress=False)
    ids = torch.randint(3, 1000, (1, 16))
    assert torch.equal(loaded(ids), model(ids))
    assert torch.equal(loaded.model.embed_tokens.weight, got)


def test_an_fp8_embedding_is_refused_by_name(model_dir):
    model = load_model(model_dir, progress=False)
    with pytest.raises(QuantError, match="fp8 checkpoints keep DeepSeek's layout"):
        quantize_model(model, "fp8", embedding=True, progress=False)
    with pytest.raises(QuantError, match="fp8 checkpoints keep DeepSeek's layout"):  # its config cannot record one
        quantize_model(model, "fp8", embedding="int8", progress=False)
