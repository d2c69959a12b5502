"""DeepSeek-V3.2 (DeepSeek Sparse Attention): HF parity where HF is an oracle, the official semantics past
index_topk, causality, decode = full forward, and the engine (paged cache, prefix caching, chunked prefill,
MTP) giving the reference decoder's tokens."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from dsv3.attention import AttentionContext, DenseLatentCache
from dsv3.attention.backend import TorchBackend
from dsv3.config import ModelConfig
from dsv3.engine import EngineConfig, LLMEngine
from dsv3.engine.sampling import SamplingParams
from dsv3.errors import ConfigError
from dsv3.io.load import load_model
from dsv3.io.tokenizer import Tokenizer
from dsv3.layers.indexer import fp8_round, hadamard
from dsv3.layers.moe import Gate
from reference_decoder import Generator
from tiny_model import make_tiny_model_dir

V32 = dict(model_type="deepseek_v32", index_n_heads=4, index_head_dim=16, index_topk=8)
HF_V32 = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
              n_group=2, topk_group=1, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=16,
              qk_nope_head_dim=16, index_topk=12, index_head_dim=32, index_n_heads=4, first_k_dense_replace=1,
              max_position_embeddings=256, rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                                                            "original_max_position_embeddings": 128, "mscale": 1.0,
                                                            "mscale_all_dim": 1.0})


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random HF DeepseekV32ForCausalLM (every parameter random, the LayerNorm bias included) and dsv3's load of it."""
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    torch.manual_seed(0)
    hf = DeepseekV32ForCausalLM(DeepseekV32Config(**HF_V32)).eval()
    with torch.no_grad():
        for _, p in hf.named_parameters():
            p.normal_(0, 0.1 if p.dim() > 1 else 0.5)
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("hf_v32")
    hf.save_pretrained(path)
    return hf, load_model(path, dtype="fp32", progress=False), path


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny V3.2 model with an MTP module and a tokenizer, built and saved by dsv3 (index_topk = 8)."""
    d = make_tiny_model_dir(tmp_path_factory.mktemp("v32"), **V32)
    return load_model(d, dtype="fp32", progress=False), Tokenizer.from_dir(d)


def test_config_as_released_and_as_transformers_writes_it(hf_pair):
    _, ours, path = hf_pair
    raw = json.loads((path / "config.json").read_text())
    assert raw["layer_types"] == ["indexed_attention"] * 3 and raw["mlp_layer_types"][0] == "dense"
    cfg = ours.config
    assert (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk) == (4, 32, 12)
    assert (cfg.scoring_func, cfg.topk_method) == ("sigmoid", "noaux_tc")  # V3's router where HF is silent
    released = {k: v for k, v in raw.items() if k not in ("layer_types", "mlp_layer_types", "index_topk")}
    assert ModelConfig.from_dict(released).index_topk == 2048  # the released default
    assert ModelConfig.from_dict(raw).to_dict()["index_topk"] == 12
    for bad, field in [({"index_topk": 0}, "index_topk"), ({"index_head_dim": 8}, "index_head_dim"),
                       ({"q_lora_rank": None}, "q_lora_rank"), ({"mlp_layer_types": ["sparse"] * 3}, "mlp_layer_types"),
                       ({"layer_types": ["full_attention"] * 3}, "layer_types")]:
        with pytest.raises(ConfigError, match=field) as e:
            ModelConfig.from_dict({**raw, **bad})
        assert "\n" not in str(e.value)


@torch.no_grad()
def test_logits_match_hf_below_index_topk(hf_pair):
    """HF is an oracle while sequences are shorter than index_topk (every key is kept): batch 2, left padding."""
    hf, ours, _ = hf_pair
    T, pad = 11, 3
    ids = torch.randint(3, 256, (2, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    got = ours(ids, pos, AttentionContext.causal(mask))
    diff = (ref - got).abs()[mask.bool()].max().item()
    assert diff <= 1e-4 and ref.abs().max() > 0.1, diff


def _interleaved(x, cos, sin):
    """The official `apply_rotary_emb`: pairs (x[2i], x[2i+1]) as complex numbers times cos + i·sin."""
    c = torch.complex(cos, sin).view(1, x.shape[1], *([1] * (x.dim() - 3)), -1)
    return torch.view_as_real(torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous()) * c).flatten(-2)


@torch.no_grad()
def test_a_dsa_layer_follows_the_official_definition(parts):
    """One MLA + indexer layer on 24 tokens (index_topk 8) against a transcription of the official prefill
    (deepseek-ai/DeepSeek-V3.2-Exp inference/model.py, `MLA.forward` with `mask`): dense scores plus an index
    mask of the top-k of the causally masked index scores. The indexer rotates half-split pairs, MLA interleaved."""
    model, _ = parts
    cfg, layer = model.config, model.model.layers[1].self_attn
    T = 24
    x = torch.randn(1, T, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(T)
    cos, sin = model.model.rotary(pos[None])
    got = layer(x, cos, sin, AttentionContext())

    H, dn, dr, dv, C = layer.n_heads, layer.nope_dim, layer.rope_dim, layer.v_dim, layer.kv_lora_rank
    qr = layer.q_a_layernorm(layer.q_a_proj(x))
    q = layer.q_b_proj(qr).view(1, T, H, dn + dr)
    q_nope, q_pe = q[..., :dn], _interleaved(q[..., dn:], cos, sin)
    kv, k_pe = layer.kv_a_proj_with_mqa(x).split([C, dr], -1)
    kv = layer.kv_a_layernorm(kv)
    k_pe = _interleaved(k_pe[:, :, None], cos, sin)
    kvb = layer.kv_b_proj(kv).view(1, T, H, dn + dv)
    k = torch.cat([kvb[..., :dn], k_pe.expand(-1, -1, H, -1)], -1)
    scores = torch.einsum("bshd,bthd->bsht", torch.cat([q_nope, q_pe], -1), k) * layer.scale
    # the indexer
    ix = layer.indexer
    Hi, Di = ix.n_heads, ix.head_dim
    iq = ix.wq_b(qr).view(1, T, Hi, Di)
    ik = ix.k_norm(ix.wk(x))

    def half(t):  # HF's rotate_half layout on the first dr values
        c = torch.cat([cos, cos], -1) if t.dim() == 3 else torch.cat([cos, cos], -1)[:, :, None]
        s = torch.cat([sin, sin], -1) if t.dim() == 3 else torch.cat([sin, sin], -1)[:, :, None]
        r = t[..., :dr]
        rot = torch.cat([-r[..., dr // 2:], r[..., : dr // 2]], -1)
        return torch.cat([r * c + rot * s, t[..., dr:]], -1)

    iq, ik = half(iq), half(ik)
    w = ix.weights_proj(x) * Hi ** -0.5 * Di ** -0.5
    index_score = (torch.einsum("bshd,btd->bsht", iq, ik).relu() * w[..., None]).sum(2)
    causal = torch.full((T, T), float("-inf")).triu(1)
    index_score = index_score + causal
    top = index_score.topk(cfg.index_topk, dim=-1).indices
    index_mask = torch.full((1, T, T), float("-inf")).scatter_(-1, top, 0) + causal
    p = (scores + index_mask[:, :, None]).softmax(-1)
    ref = layer.o_proj(torch.einsum("bsht,bthd->bshd", p, kvb[..., dn:]).flatten(2))
    assert (index_mask[0, -1] == 0).sum() == cfg.index_topk  # late queries really are sparse
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_indexer_scores_by_hand():
    """Two heads, three keys, numbers small enough to check on paper: score = Σ_h w_h · relu(q_h · k)."""
    be = TorchBackend()
    q = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]]])  # [B=1, T=1, Hi=2, Di=2]
    w = torch.tensor([[[0.5, -1.0]]])
    keys = torch.tensor([[[1.0, 1.0], [-1.0, 3.0], [2.0, -1.0]]])
    # key 0: 0.5·relu(1) - 1·relu(2) = -1.5; key 1: 0.5·relu(-1) - 1·relu(6) = -6; key 2: 0.5·relu(2) - 1·relu(-2) = 1
    torch.testing.assert_close(be.index_scores(q, w, keys), torch.tensor([[[-1.5, -6.0, 1.0]]]))
    idx, ok = be.topk_select(torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0]]), torch.tensor([[True, True, True, True, False]]), 2)
    assert idx.tolist() == [[0, 2]] and ok.all()  # ties go to the earliest positions; invalid keys never win


def test_fp8_index_option_is_the_references_rounding():
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    h = hadamard(x)
    torch.testing.assert_close(hadamard(h), x, atol=1e-5, rtol=1e-5)  # orthonormal and symmetric
    torch.testing.assert_close(h @ h.T, x @ x.T, atol=1e-3, rtol=1e-4)  # dot products kept
    r = fp8_round(h)
    rel = ((r - h).abs().amax(-1) / h.abs().amax(-1)).max()
    assert 0 < rel <= 2 ** -4  # e4m3 keeps 3 mantissa bits: half an ulp at the top binade is 1/16


@torch.no_grad()
def test_sparse_attention_is_causal_and_really_sparse(parts):
    """Appending tokens moves no earlier logit (≤ 1e-4) on sequences 6× index_topk; and the top-k matters."""
    model, _ = parts
    ids = torch.randint(3, model.config.vocab_size, (2, 60), generator=torch.Generator().manual_seed(5))
    full = model(ids)
    for n in (20, 47):
        assert (model(ids[:, :n]) - full[:, :n]).abs().max() <= 1e-4
    topk = model.config.index_topk
    try:
        for b in model.model.layers:
            b.self_attn.indexer.topk = 10 ** 6
        dense = model(ids)
    finally:
        for b in model.model.layers:
            b.self_attn.indexer.topk = topk
    assert (dense[:, :topk] - full[:, :topk]).abs().max() <= 1e-4  # within the top-k every key is kept
    assert (dense[:, 30:] - full[:, 30:]).abs().max() > 1e-2


@torch.no_grad()
def test_incremental_decode_equals_the_full_forward(parts):
    model, _ = parts
    ids = torch.randint(3, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(6))
    full = model(ids)
    for impl in ("auto", "naive"):
        cache = DenseLatentCache.for_model(model, 2, 48, impl=impl)
        steps = [model(ids[:, :5], None, cache)] + [model(ids[:, t:t + 1], None, cache) for t in range(5, 40)]
        assert (torch.cat(steps, 1) - full).abs().max() <= 1e-4


@torch.no_grad()
def _margin(model, seq: list[int]) -> float:
    """Smallest decision margin at the last position: top-2 logits, MoE expert choice, and the indexer's
    k-th vs (k+1)-th score in every layer (a near-tie there may flip which key is kept)."""
    margins = []
    be = TorchBackend
    real = be.topk_select

    def topk_select(self, scores, valid, k):
        s = scores[..., -1, :].masked_fill(~valid.expand(scores.shape)[..., -1, :], float("-inf")).flatten()
        s = s[torch.isfinite(s)].sort(descending=True).values
        if s.numel() > k:
            margins.append(float(s[k - 1] - s[k]))
        return real(self, scores, valid, k)

    def hook(gate, inputs, output):
        _, _, scores = output
        choice = scores + (gate.e_score_correction_bias if gate.e_score_correction_bias is not None else 0)
        top = choice[-1].topk(gate.top_k + 1).values
        margins.append(float(top[-2] - top[-1]))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Gate)]
    be.topk_select = topk_select
    try:
        top2 = model(torch.tensor([seq]))[0, -1].topk(2).values
    finally:
        be.topk_select = real
        for h in handles:
            h.remove()
    return min([float(top2[0] - top2[1])] + margins)


@pytest.mark.parametrize("cfg", [dict(), dict(max_num_batched_tokens=32), dict(num_speculative_tokens=1)],
                         ids=["default", "chunked", "mtp"])
def test_engine_gives_the_reference_decoders_tokens(parts, cfg):
    """Paged cache (latents and index keys), prefix caching on shared prefixes, chunked prefill and MTP drafts:
    greedy tokens equal the contiguous-cache reference decoder's but for near-ties (< 1e-4)."""
    model, tok = parts
    rng = random.Random(0)
    prompts = [[rng.randrange(3, tok.vocab_size) for _ in range(rng.randint(2, 70))] for _ in range(12)]
    prompts[1:4] = [prompts[0][:30] + p[:8] for p in prompts[1:4]]
    params = [SamplingParams(max_tokens=rng.randint(4, 20), temperature=0, ignore_eos=True) for _ in prompts]
    gen = Generator(model, tok)
    ref = [gen.complete(p, sp).token_ids for p, sp in zip(prompts, params)]
    engine = LLMEngine(model, tok, EngineConfig(max_model_len=256, **cfg))
    first = engine.generate(prompts[:1], params[:1])  # its blocks are then cached for the prompts sharing its prefix
    outs = first + engine.generate(prompts[1:], params[1:])
    assert engine.block_manager.prefix_hits > 0
    if cfg.get("num_speculative_tokens"):
        assert engine.stats["spec_draft_tokens"] > 0
    for p, r, o in zip(prompts, ref, outs):
        got = o.outputs[0].token_ids
        if got == r:
            continue
        k = next(i for i, (a, b) in enumerate(zip(got, r)) if a != b)
        margin = _margin(model, p + r[:k])
        assert margin < 1e-4, f"divergence at output token {k} with decision margin {margin:.2e}"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_int8_cache_keeps_index_keys_close(parts):
    model, tok = parts
    prompts = [[random.Random(i).randrange(3, tok.vocab_size) for _ in range(40)] for i in range(8)]
    sp = SamplingParams(max_tokens=1, temperature=0)
    fp = LLMEngine(model, tok, EngineConfig(max_model_len=64))
    q8 = LLMEngine(model, tok, EngineConfig(max_model_len=64, kv_cache_dtype="int8"))
    assert q8.runner.cache.index.dtype == torch.int8
    agree = sum(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(fp.generate(prompts, sp), q8.generate(prompts, sp)))
    assert agree >= 6


def test_cache_bytes_per_token_count_the_index_keys(parts):
    model, tok = parts
    engine = LLMEngine(model, tok, EngineConfig(max_model_len=64))
    c = model.config
    per_layer = (c.kv_lora_rank + c.qk_rope_head_dim + c.index_head_dim) * 4
    assert engine.runner.cache.bytes_per_token() == per_layer * (c.num_hidden_layers + 1)  # + the MTP layer
    assert engine.runner.cache.index.shape[-1] == c.index_head_dim
    assert math.isclose(per_layer / ((c.kv_lora_rank + c.qk_rope_head_dim) * 4), (32 + 8 + 16) / 40)


@torch.no_grad()
def test_awq_scales_fold_into_the_indexer_too(parts):
    """AWQ rescales the inputs of the linears that share a norm and folds 1/s into the norm; the indexer reads
    the same normed input (wk, weights_proj) and compressed query (wq_b), so it must be rescaled with them: the
    float model after calibration computes the same function."""
    import copy

    from dsv3.quant.awq import awq_calibrate

    model, _ = parts
    ids = torch.randint(3, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(7))
    q = copy.deepcopy(model)
    awq_calibrate(q, torch.randint(3, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(8)),
                  group_size=32, progress=False)
    ln = q.model.layers[1].self_attn.q_a_layernorm.weight
    assert not torch.equal(ln, model.model.layers[1].self_attn.q_a_layernorm.weight)  # scales were folded
    torch.testing.assert_close(q(ids), model(ids), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_quantized_v32_checkpoints_round_trip_with_the_indexer(parts, tmp_path):
    """int8 / AWQ int4 / FP8: the indexer's projections are converted, its head weights stay fp32, and the saved
    checkpoint loads packed with the same logits; int8 stays close to fp32."""
    import copy

    from dsv3.quant import load_quantized, quantize_model, save_quantized
    from dsv3.quant.linear import QuantLinear

    model, _ = parts
    ids = torch.randint(3, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(7))
    ref = model(ids)
    for method in ("int8", "awq", "fp8"):
        q = copy.deepcopy(model)
        calib = torch.randint(3, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(8))
        quantize_model(q, method, group_size=32, calib=calib if method == "awq" else None, progress=False)
        ix = q.model.layers[1].self_attn.indexer
        assert isinstance(ix.wq_b, QuantLinear) and isinstance(ix.wk, QuantLinear)
        assert not isinstance(ix.weights_proj, QuantLinear)
        got = q(ids)
        if method == "int8":
            assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8
        save_quantized(q, tmp_path / method, dtype="fp32")  # the default bf16 storage rounds embedding and head
        torch.testing.assert_close(load_quantized(tmp_path / method, progress=False)(ids), got, atol=1e-4, rtol=1e-4)


def test_lora_adapter_equals_peft_on_transformers_v32(hf_pair, tmp_path, monkeypatch):
    """dsv3's default adapter on a V3.2 model (the indexer is not adapted) loads in PEFT with equal logits."""
    peft = pytest.importorskip("peft")
    import transformers

    from dsv3.lora import LoRASpec, inject_lora, save_adapter

    _, _, path = hf_pair
    ours = load_model(path, dtype="fp32", progress=False)
    spec = LoRASpec(r=4, lora_alpha=8)
    names = inject_lora(ours, spec)
    assert names and not any("indexer" in n for n in names)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_adapter(ours, tmp_path / "ad", spec)
    monkeypatch.setattr("peft.tuners.tuners_utils.is_transformers_ge_v5", False)  # see test_lora_peft._peft_logits
    monkeypatch.setattr("peft.utils.save_and_load.is_transformers_ge_v5", False)
    hf = transformers.DeepseekV32ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = hf(input_ids=ids).logits
        ref = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()(input_ids=ids).logits
        got = ours.eval()(ids)
    assert (ref - base).abs().max() > 0.05 and (ref - got).abs().max() <= 1e-4


def test_fp8_block_checkpoint_loads(hf_pair, tmp_path):
    """Released V3.2 files store MLA and indexer projections as FP8 e4m3 with 128×128 block scales: loading them
    gives the model whose weights are those blocks dequantized."""
    from safetensors.torch import load_file, save_file

    from test_checkpoint import fp8_quantize

    _, _, path = hf_pair
    tensors = load_file(path / "model.safetensors")
    fp8, deq = {}, {}
    for name, t in tensors.items():
        fp8[name] = deq[name] = t
        if name.endswith(("indexer.wq_b.weight", "indexer.wk.weight", "q_b_proj.weight", "kv_b_proj.weight")):
            q, sc = fp8_quantize(t)
            fp8[name], fp8[name.replace(".weight", ".weight_scale_inv")] = q, sc
            full = sc.repeat_interleave(128, 0).repeat_interleave(128, 1)[: t.shape[0], : t.shape[1]]
            deq[name] = q.float() * full
    cfg = json.loads((path / "config.json").read_text())
    for d, ts, qc in ((tmp_path / "fp8", fp8, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                               "weight_block_size": [128, 128]}), (tmp_path / "deq", deq, None)):
        d.mkdir()
        save_file(ts, d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({**cfg, **({"quantization_config": qc} if qc else {})}))
    ids = torch.randint(3, 256, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = load_model(tmp_path / "fp8", dtype="fp32", progress=False)(ids)
        want = load_model(tmp_path / "deq", dtype="fp32", progress=False)(ids)
        orig = load_model(path, dtype="fp32", progress=False)(ids)
    assert (got - want).abs().max() <= 1e-4 and (got - orig).abs().max() > 1e-4  # FP8 values really were read


def test_dsv3_generate_runs_a_v32_checkpoint(tmp_path):
    """`dsv3 generate` on a V3.2 directory, as users run it: exit 0 and exactly the Python API's completion."""
    from dsv3 import LLM
    from test_generate import dsv3

    d = make_tiny_model_dir(tmp_path / "m", **V32)
    r = dsv3("generate", "--model", str(d), "--dtype", "fp32", "--max-tokens", "12", "def f(x):")
    assert r.returncode == 0, r.stderr
    want = LLM(str(d), dtype="fp32").generate("def f(x):", SamplingParams(max_tokens=12, temperature=0))[0].outputs[0].text
    assert r.stdout == want + "\n"
