"""DeepSeek-V4: config as released and as transformers writes it, HF parity, the official semantics (a transcription
of the official prefill; a compressor and an indexer step by hand), causality, incremental decode = full forward,
checkpoints in three layouts, FP8 / FP4 weights (the engine: test_deepseek_v4_engine.py)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from dsv3.attention.backend import TorchBackend
from dsv3.config import ModelConfig
from dsv3.errors import ConfigError
from dsv3.io.checkpoint import save_model
from dsv3.io.load import load_model
from dsv3.layers.compressor import empty_carry, pool
from dsv3.models.deepseek_v4.model import DeepseekV4ForCausalLM, visible_entries
from dsv3.models.deepseek_v4.state import V4State

CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
TYPES = [SWA, CSA, HCA, CSA]
# window 8, CSA 4:1 with top-3, HCA 8:1; 8 index heads, so that index scores are not tied (see test_index_ties)
HF_V4 = dict(vocab_size=256, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
             head_dim=32, q_lora_rank=48, partial_rotary_factor=0.25, n_routed_experts=8, num_experts_per_tok=2,
             sliding_window=8, o_groups=2, o_lora_rank=16, index_n_heads=8, index_head_dim=16, index_topk=3, hc_mult=2,
             layer_types=TYPES, compress_rates={CSA: 4, HCA: 8}, mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
             max_position_embeddings=512, rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32,
                                                           "beta_slow": 1, "original_max_position_embeddings": 128})
RELEASED = dict(  # the same model as the released config.json spells it (+ one MTP layer, sliding)
    model_type="deepseek_v4", vocab_size=256, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=1, head_dim=32, q_lora_rank=48, qk_rope_head_dim=8, n_routed_experts=8,
    num_experts_per_tok=2, n_shared_experts=1, sliding_window=8, o_groups=2, o_lora_rank=16, index_n_heads=8,
    index_head_dim=16, index_topk=3, hc_mult=2, hc_sinkhorn_iters=20, hc_eps=1e-6, compress_ratios=[0, 4, 8, 4, 0],
    compress_rate_csa=4, compress_rate_hca=8, num_hash_layers=1, num_nextn_predict_layers=1, scoring_func="sqrtsoftplus",
    topk_method="noaux_tc", routed_scaling_factor=1.5, swiglu_limit=10.0, norm_topk_prob=True, rope_theta=10000,
    compress_rope_theta=160000, max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-6,
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1})


def _randomize(hf) -> None:
    """Every parameter and buffer random, the ones HF initialises to zero included (sinks, mHC bases, position biases,
    router biases); the hash table holds distinct experts per token."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() > 1 else 0.5) + (1.0 if n.endswith("norm.weight") else 0.0))
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif n.endswith("tid2eid"):
                b.copy_(torch.rand(b.shape[0], 8, generator=g).argsort(-1)[:, : b.shape[1]])


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random HF DeepseekV4ForCausalLM saved by save_pretrained, and dsv3's load of it."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    hf = DeepseekV4ForCausalLM(DeepseekV4Config(**HF_V4)).eval()
    _randomize(hf)
    path = tmp_path_factory.mktemp("hf_v4")
    hf.save_pretrained(path)
    return hf, load_model(path, dtype="fp32", progress=False), path


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """A tiny V4 with an MTP module, built and saved by dsv3 (every tensor random)."""
    cfg = ModelConfig.from_dict(RELEASED)
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(cfg)
    model.reset_buffers()
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(1), every_tensor=True)
    path = tmp_path_factory.mktemp("v4_native")
    save_model(model, path)
    return load_model(path, dtype="fp32", progress=False), path


def _ids(B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- config -----------------------------------------------------------------------------------

def test_config_as_released_and_as_transformers_writes_it(hf_pair):
    from transformers import DeepseekV4Config

    _, ours, path = hf_pair
    raw = json.loads((path / "config.json").read_text())
    assert "rope_parameters" in raw and "compress" in raw["rope_parameters"]  # transformers' nested spelling
    hf_cfg, rel = ours.config, ModelConfig.from_dict(RELEASED)
    for k in ("head_dim", "qk_rope_head_dim", "sliding_window", "hc_mult", "o_groups", "o_lora_rank", "num_hash_layers",
              "swiglu_limit", "compress_rope_theta", "rope_theta", "index_topk", "index_n_heads", "scoring_func",
              "routed_scaling_factor", "compress_rates"):
        assert getattr(hf_cfg, k) == getattr(rel, k), k
    assert hf_cfg.layer_types[:4] == rel.layer_types[:4] == tuple(TYPES)
    assert rel.layer_types[4] == SWA and rel.compress_ratio(4) == 0  # the MTP layer, as released
    assert hf_cfg.rope_scaling.factor == rel.rope_scaling.factor == 4.0
    assert [rel.compress_ratio(i) for i in range(4)] == [0, 4, 8, 4]
    # what dsv3 writes, transformers reads back to the same model; and dsv3 reads it back to the same config
    out = rel.to_dict()
    assert "kv_lora_rank" not in out and out["layer_types"] == TYPES and out["compress_ratios"] == [0, 4, 8, 4, 0]
    back = DeepseekV4Config(**{k: v for k, v in json.loads(json.dumps(out)).items()  # (it edits the dicts it gets)
                               if k not in ("model_type", "architectures")})
    assert back.layer_types == TYPES and back.mlp_layer_types == ["hash_moe", "moe", "moe", "moe"]
    assert back.qk_rope_head_dim == 8 and back.rope_parameters["compress"]["factor"] == 4.0
    again = ModelConfig.from_dict(out)
    assert again.layer_types == rel.layer_types and again.to_dict() == out
    # defaults where silent are transformers' (V4-Flash's)
    bare = ModelConfig.from_dict({k: RELEASED[k] for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                                                           "num_attention_heads", "q_lora_rank", "n_routed_experts",
                                                           "num_experts_per_tok", "moe_intermediate_size")})
    assert (bare.head_dim, bare.qk_rope_head_dim, bare.sliding_window, bare.index_topk, bare.hc_mult) == (512, 64, 128, 512, 4)
    assert bare.layer_types[:4] == (HCA, HCA, HCA, CSA) and bare.compress_rates == {CSA: 4, HCA: 128}


@pytest.mark.parametrize("bad, field", [
    ({"layer_types": [SWA, "full_attention", CSA, CSA]}, "layer_types"),
    ({"layer_types": [SWA, SWA, SWA, SWA]}, "contradicts 'compress_ratios'"),
    ({"compress_ratios": [0, 4, 16, 4, 0]}, "compress_ratios"),
    ({"mlp_layer_types": ["moe", "hash_moe", "moe", "moe"]}, "mlp_layer_types"),
    ({"mlp_layer_types": ["hash_moe", "hash_moe", "moe", "moe"]}, "contradicts 'num_hash_layers'"),
    ({"o_groups": 3}, "o_groups"),
    ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ({"n_shared_experts": 2}, "n_shared_experts"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    ({"partial_rotary_factor": 0.5}, "contradicts 'partial_rotary_factor'"),
    ({"index_head_dim": 4}, "index_head_dim"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"compress_rates": {CSA: 4, "x": 2}}, "compress_rates"),
    ({"expert_dtype": "int3"}, "expert_dtype"),
    ({"rope_parameters": {"main": {"rope_type": "yarn", "factor": 2}, "compress": {"rope_type": "default"}}},
     "rope_parameters.main"),
])
def test_config_errors_are_one_line_naming_the_field(bad, field):
    with pytest.raises(ConfigError, match=re.escape(field)) as e:
        ModelConfig.from_dict({**RELEASED, **bad})
    assert "\n" not in str(e.value)


# ---- HF parity ----------------------------------------------------------------------------------

@torch.no_grad()
def test_logits_match_hf(hf_pair):
    """Within 1e-4 of transformers 5.24 (batch 2): below the window and the first compression boundaries, just past
    them, and over 8 windows / 16 CSA entries (HF's full forward follows the official semantics when no index scores
    tie; see test_index_ties)."""
    hf, ours, _ = hf_pair
    for T in (3, 7, 12, 64):
        ids = _ids(2, T, T)
        ref, got = hf(input_ids=ids).logits, ours(ids)
        assert ref.abs().max() > 0.5
        assert (ref - got).abs().max().item() <= 1e-4, T


# ---- the official semantics ----------------------------------------------------------------------

def _official_rope(x, cos, sin, inverse=False):
    """The official `apply_rotary_emb` on x[..., -rd:]: pairs as complex numbers times (cos + i·sin) (conjugate back)."""
    rd = 2 * cos.shape[-1]
    c = torch.complex(cos, -sin if inverse else sin)
    tail = torch.view_as_complex(x[..., -rd:].float().unflatten(-1, (-1, 2)).contiguous())
    while c.dim() < tail.dim():
        c = c.unsqueeze(-2)
    return torch.cat([x[..., :-rd], torch.view_as_real(tail * c).flatten(-2)], -1)


def _official_compressor(comp, x, rope_at):
    """The official `Compressor.forward` at start_pos 0 (prefill), without its FP8/FP4 rounding (QAT simulation)."""
    B, T, _ = x.shape
    r, d, overlap = comp.ratio, comp.head_dim, comp.overlap
    kv, score = comp.wkv(x.float()), comp.wgate(x.float())
    cutoff = T - T % r
    kv = kv[:, :cutoff].unflatten(1, (-1, r))
    score = score[:, :cutoff].unflatten(1, (-1, r)) + comp.ape
    if overlap:
        def transform(t, value):
            new = t.new_full((B, t.shape[1], 2 * r, d), value)
            new[:, :, r:] = t[:, :, :, d:]
            new[:, 1:, :r] = t[:, :-1, :, :d]
            return new
        kv, score = transform(kv, 0), transform(score, float("-inf"))
    kv = (kv * score.softmax(dim=2)).sum(dim=2)
    cos, sin = rope_at(torch.arange(0, cutoff, r)[None])
    return _official_rope(comp.norm(kv), cos, sin)


def _official_sparse_attn(q, kv, sink, idx, scale):
    """The official `sparse_attn`: each query attends to kv rows idx (-1: none), one softmax with the sink logit."""
    valid = idx >= 0
    sel = kv[:, None].expand(-1, idx.shape[1], -1, -1).gather(2, idx.clamp(min=0)[..., None].expand(-1, -1, -1, kv.shape[-1]))
    s = torch.einsum("bshd,bskd->bshk", q.float(), sel.float()) * scale
    s = s.masked_fill(~valid[:, :, None], float("-inf"))
    logits = torch.cat([s, sink.view(1, 1, -1, 1).expand(*s.shape[:3], 1)], -1)
    return torch.einsum("bshk,bskd->bshd", logits.softmax(-1)[..., :-1], sel.float())


@torch.no_grad()
def test_layers_follow_the_official_prefill(hf_pair):
    """One CSA and one HCA layer on 40 tokens against a transcription of the official `Attention.forward` at start_pos 0:
    window indices (`get_window_topk_idxs`), compressed indices (`get_compress_topk_idxs` / the `Indexer`'s top-k after
    its causal mask, -1 where an entry is not complete by the query), index gathering and `sparse_attn`."""
    _, model, _ = hf_pair
    cfg, T, B = model.config, 40, 1
    x = torch.randn(B, T, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    rot = model.model.rotary_compress
    cos, sin = rot(torch.arange(T)[None])
    for li in (1, 2):
        layer = model.model.layers[li].attn
        got = layer(x, model._rope(torch.arange(T)[None]), V4State.fresh(model, B, T).layer(li), 0)
        H, hd, win, r = layer.n_heads, layer.head_dim, layer.window, layer.ratio
        qr = layer.q_norm(layer.wq_a(x))
        q = layer.wq_b(qr).unflatten(-1, (H, hd))
        q = _official_rope(q * torch.rsqrt(q.square().mean(-1, keepdim=True) + cfg.rms_norm_eps), cos, sin)
        kv = _official_rope(layer.kv_norm(layer.wkv(x)), cos, sin)
        base = torch.arange(T)[:, None]
        widx = (base - win + 1).clamp(0) + torch.arange(min(T, win))
        widx = torch.where(widx > base, -1, widx)
        if layer.indexer is None:
            cidx = torch.arange(T // r).repeat(T, 1)
            cidx = torch.where(cidx >= torch.arange(1, T + 1)[:, None] // r, -1, cidx + T)
        else:
            ix = layer.indexer
            iq = _official_rope(ix.wq_b(qr).unflatten(-1, (ix.n_heads, ix.head_dim)), cos, sin)
            ik = _official_compressor(ix.compressor, x, rot)
            w = ix.weights_proj(x) * (ix.head_dim ** -0.5 * ix.n_heads ** -0.5)
            score = (torch.einsum("bshd,btd->bsht", iq, ik).relu() * w[..., None]).sum(2)
            future = torch.arange(T // r).repeat(T, 1) >= torch.arange(1, T + 1)[:, None] // r
            score = score + torch.where(future, float("-inf"), 0.0)
            top = score.topk(min(ix.topk, T // r), dim=-1)[1]
            cidx = torch.where(top >= torch.arange(1, T + 1)[:, None] // r, -1, top + T)[0]
        idx = torch.cat([widx, cidx], -1)[None]
        kv_all = torch.cat([kv, _official_compressor(layer.compressor, x, rot)], 1)
        o = _official_sparse_attn(q, kv_all, layer.attn_sink, idx, hd ** -0.5)
        o = _official_rope(o, cos, sin, inverse=True)
        o = torch.einsum("bsgd,grd->bsgr", o.view(B, T, layer.n_groups, -1), layer.wo_a.weight.view(layer.n_groups, layer.o_rank, -1))
        want = layer.wo_b(o.flatten(2))
        assert (got - want).abs().max().item() <= 1e-5 and want.abs().max() > 0.05, li


def _softmax(xs):
    m = max(xs)
    e = [math.exp(v - m) if v != float("-inf") else 0.0 for v in xs]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("overlap", [False, True])
def test_one_compressor_step_by_hand(overlap):
    """`pool` against the official definition computed by hand: ratio 2, d 2, five tokens, every feature its own
    softmax over the window's slots (with overlap: window w-1's first halves and window w's second halves); in one
    call and one token at a time (the carry)."""
    r, d, T = 2, 2, 5
    c = 2 if overlap else 1
    kv = [[(t + 1) * 0.5 * (-1) ** f + f for f in range(c * d)] for t in range(T)]
    sc = [[0.3 * t - 0.2 * f + (0.7 if (t + f) % 3 == 0 else 0.0) for f in range(c * d)] for t in range(T)]
    want = []
    for w in range(T // r):
        entry = []
        for f in range(d):
            slots = [(kv[t][d + f if overlap else f], sc[t][d + f if overlap else f]) for t in range(w * r, w * r + r)]
            if overlap:
                prev = [(kv[t][f], sc[t][f]) for t in range((w - 1) * r, w * r)] if w else [(0.0, float("-inf"))] * r
                slots = prev + slots
            p = _softmax([s for _, s in slots])
            entry.append(sum(pi * v for pi, (v, _) in zip(p, slots)))
        want.append(entry)
    want = torch.tensor(want)[None]
    kv_t, sc_t = torch.tensor(kv)[None], torch.tensor(sc)[None]
    carry = empty_carry(1, r, d, overlap)
    assert torch.allclose(pool(kv_t, sc_t, *carry, 0, r, overlap), want, atol=1e-6)
    carry = empty_carry(1, r, d, overlap)
    steps = torch.cat([pool(kv_t[:, t:t + 1], sc_t[:, t:t + 1], *carry, t, r, overlap) for t in range(T)], 1)
    assert torch.allclose(steps, want, atol=1e-6)


def test_one_indexer_step_by_hand(hf_pair):
    """An indexer step with small numbers: score(t, w) = Σ_h w_h·relu(q_h·k_w), top-k among the entries whose tokens
    are all ≤ t (ratio 4: (w+1)·4 ≤ t+1), and the head weights as `Indexer.queries` folds its scales in."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])          # 2 index heads, dim 2
    w = torch.tensor([1.0, -0.5])
    keys = torch.tensor([[1.0, 2.0], [3.0, -1.0], [-2.0, 1.0]])
    # by hand: head 0 dots (1, 3, -2) -> relu (1, 3, 0); head 1 dots (2, -1, 1) -> relu (2, 0, 1)
    want = torch.tensor([1 * 1 - 0.5 * 2, 1 * 3 - 0.5 * 0, 1 * 0 - 0.5 * 1])  # (0, 3, -0.5)
    be = TorchBackend()
    got = be.index_scores(q[None, None], w[None, None], keys[None])[0, 0]
    assert torch.allclose(got, want)
    pos = torch.tensor([2, 3, 10, 11])
    vis = visible_entries(pos, 3, 4)
    assert vis.tolist() == [[False] * 3, [True, False, False], [True, True, False], [True, True, True]]
    sel = be.sparse_mask(q[None, None].expand(1, 4, 2, 2), w[None, None].expand(1, 4, 2), keys[None], vis[None], 2)[0]
    # top-2 by score among the visible: t=3 sees entry 0 only; t=10 both of 0, 1; t=11 picks 1 (3) and 0 (0) over 2 (-0.5)
    assert sel.tolist() == [[False] * 3, [True, False, False], [True, True, False], [True, True, False]]
    # `Indexer.queries` folds index_head_dim^-1/2 · index_n_heads^-1/2 into weights_proj's output
    _, model, _ = hf_pair
    ix = model.model.layers[1].attn.indexer
    x = torch.randn(1, 2, 64, generator=torch.Generator().manual_seed(0))
    cos, sin = model.model.rotary_compress(torch.arange(2)[None])
    iq, iw = ix.queries(x, torch.randn(1, 2, 48), cos, sin)
    assert torch.allclose(iw, ix.weights_proj(x) / math.sqrt(16 * 8), atol=1e-6)


# ---- causality and decoding ----------------------------------------------------------------------

@torch.no_grad()
def test_appending_tokens_moves_no_earlier_logit(hf_pair):
    """12 windows, 24 CSA entries (top-3), 12 HCA entries: prefixes' logits do not move; the top-k matters."""
    _, model, _ = hf_pair
    ids = _ids(2, 96, 11)
    full = model(ids)
    for T in (9, 17, 33, 61):
        assert (model(ids[:, :T]) - full[:, :T]).abs().max().item() <= 1e-4, T
    for blk in model.model.layers:
        if blk.attn.indexer is not None:
            blk.attn.indexer.topk = 1000
    try:
        assert (model(ids) - full).abs().max().item() > 1e-2  # keeping every entry changes the answer
    finally:
        for blk in model.model.layers:
            if blk.attn.indexer is not None:
                blk.attn.indexer.topk = 3


@torch.no_grad()
def test_incremental_decode_equals_full_forward(native):
    """A V4State fed token by token or in uneven chunks (batch 2) gives the full forward's logits; so does the MTP
    module over its own state."""
    model, _ = native
    ids = _ids(2, 50, 5)
    full = model(ids)
    for steps in ([1] * 50, [5, 1, 3, 9, 1, 2, 17, 12]):
        st, outs, t = V4State(model, 2, 50), [], 0
        for n in steps:
            outs.append(model(ids[:, t:t + n], ctx=st))
            t += n
        assert (torch.cat(outs, 1) - full).abs().max().item() <= 1e-4, steps
        assert st.length == 50
    h = model.streams(ids)
    nxt = ids.roll(-1, 1)
    pos = torch.arange(50).expand(2, -1)
    want = model.mtp_logits(h, nxt, pos)
    st, outs = V4State(model, 2, 50, mtp=True), []
    for a, b in ((0, 7), (7, 8), (8, 30), (30, 50)):
        outs.append(model.mtp_logits(h[:, a:b], nxt[:, a:b], pos[:, a:b], st))
    assert (torch.cat(outs, 1) - want).abs().max().item() <= 1e-4
    hidden, logits = model.step(ids[:, :6], None, V4State(model, 2, 6), rows=[0, 11])
    assert hidden.shape == (12, 2 * 64) and torch.allclose(logits, full[:, :6].reshape(12, -1)[[0, 11]], atol=1e-4)


def test_cache_specs_describe_the_state(native):
    """cache_specs(): a window ring on every layer, compressed entries (+ indexer keys) per ratio tokens and the
    carries, sized as V4State allocates them."""
    model, _ = native
    specs = model.cache_specs()
    assert [s.kind for s in specs] == ["window", "compressed", "compressed", "compressed", "window"]
    assert [s.ratio for s in specs] == [0, 4, 8, 4, 0] and specs[1].index_dim == 16 and specs[2].index_dim == 0
    L = 64
    st, mtp = V4State(model, 1, L), V4State(model, 1, L, mtp=True)
    for i, spec in enumerate(specs):
        layer = (st if i < 4 else mtp).layer(i)
        held = sum(t.nbytes for t in vars(layer).values() if t is not None)
        assert spec.bytes_per_sequence(torch.float32, L) == held, i
    assert specs[0].bytes_per_token(torch.float32) == 0 and specs[1].bytes_per_token(torch.float32) == (32 + 16) * 4 // 4


@torch.no_grad()
def test_index_ties_break_to_the_earliest_entry():
    """With two index heads the ReLU often zeroes every head, so index scores tie; dsv3 keeps the earliest entries, which
    makes a query choose the same entries whatever follows it (causal) and in a decode step. (transformers' and the
    official code's `torch.topk` break such ties by memory layout: see docs/long-context.md.)"""
    cfg = ModelConfig.from_dict({**RELEASED, "index_n_heads": 2})
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(cfg, with_mtp=False)
    model.reset_buffers()
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(2), every_tensor=True)
    ids = _ids(1, 48, 3)
    full = model(ids)
    assert (model(ids[:, :17]) - full[:, :17]).abs().max().item() <= 1e-4
    st = V4State(model, 1, 48)
    steps = torch.cat([model(ids[:, t:t + 1], ctx=st) for t in range(48)], 1)
    assert (steps - full).abs().max().item() <= 1e-4


# ---- checkpoints --------------------------------------------------------------------------------

def _released_name(name: str) -> str:
    """dsv3's parameter name -> the released checkpoint's (official) name, independently of dsv3's mapping."""
    fixed = {"model.embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight", "model.norm.weight": "norm.weight"}
    if name in fixed:
        return fixed[name]
    name = name.replace("ffn.gate.e_score_correction_bias", "ffn.gate.bias")
    return name.removeprefix("model.")


def _released_tensors(model) -> dict[str, torch.Tensor]:
    out, Im = {}, model.config.moe_intermediate_size
    for name, t in model.state_dict().items():
        n = _released_name(name)
        if n.endswith("experts.gate_up_proj") or n.endswith("experts.down_proj"):
            base = n.rsplit(".", 1)[0]
            for j in range(t.shape[0]):
                if n.endswith("down_proj"):
                    out[f"{base}.{j}.w2.weight"] = t[j].clone()
                else:
                    out[f"{base}.{j}.w1.weight"], out[f"{base}.{j}.w3.weight"] = t[j, :Im].clone(), t[j, Im:].clone()
        else:
            out[n] = t.clone()
    if model.num_mtp_layers:  # the release stores copies of the embedding and head with the MTP module
        out["mtp.0.emb.tok_emb.weight"], out["mtp.0.head.weight"] = out["embed.weight"].clone(), out["head.weight"].clone()
    out["layers.0.ffn.gate.tid2eid"] = out["layers.0.ffn.gate.tid2eid"].int()  # int32 as released
    return out


def _write(path: Path, tensors: dict, config: dict) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


@torch.no_grad()
def test_every_layout_loads_to_the_same_logits(hf_pair, native, tmp_path):
    """transformers' save_pretrained (default and module names), the released layout (with MTP and its emb/head copies),
    and dsv3's own save -- which transformers loads to the same logits."""
    from transformers import DeepseekV4ForCausalLM as HF

    hf, ours, path = hf_pair
    ids = _ids(2, 20, 1)
    want = ours(ids)
    hf.save_pretrained(tmp_path / "modules", save_original_format=False)
    names = json.loads((tmp_path / "modules/config.json").read_text()) and __import__("safetensors").safe_open(
        str(tmp_path / "modules/model.safetensors"), "pt").keys()
    assert "model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight" in names
    assert torch.allclose(load_model(tmp_path / "modules", dtype="fp32", progress=False)(ids), want, atol=1e-6)
    save_model(ours, tmp_path / "dsv3")
    back = HF.from_pretrained(tmp_path / "dsv3").eval()
    assert torch.allclose(back(input_ids=ids).logits, want, atol=1e-5)
    model, npath = native
    want = model(ids)
    rel = _write(tmp_path / "released", _released_tensors(model), RELEASED)
    loaded = load_model(rel, dtype="fp32", progress=False)
    assert loaded.num_mtp_layers == 1
    assert torch.allclose(loaded(ids), want, atol=1e-6)
    h, nxt, pos = model.streams(ids), ids.roll(-1, 1), torch.arange(20).expand(2, -1)
    assert torch.allclose(loaded.mtp_logits(h, nxt, pos), model.mtp_logits(h, nxt, pos), atol=1e-6)


def _fp8_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 weights with one power-of-two (e8m0) scale per 128×128 block, as DeepSeek releases them."""
    N, K = w.shape
    gn, gk = -(-N // block), -(-K // block)
    pad = torch.zeros(gn * block, gk * block)
    pad[:N, :K] = w
    amax = pad.view(gn, block, gk, block).abs().amax((1, 3)).clamp(min=1e-4)
    scale = torch.pow(2.0, torch.ceil(torch.log2(amax / 448.0)))
    q = (pad.view(gn, block, gk, block) / scale[:, None, :, None]).view(gn * block, gk * block)[:N, :K]
    return q.to(torch.float8_e4m3fn), scale.to(torch.float8_e8m0fnu)


_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _fp4_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e2m1 values two a byte (low nibble first) with one e8m0 scale per 32 inputs, as the released experts."""
    N, K = w.shape
    blocks = w.view(N, K // 32, 32)
    scale = torch.pow(2.0, torch.ceil(torch.log2(blocks.abs().amax(-1).clamp(min=1e-8) / 6.0)))
    v = blocks / scale[..., None]
    code = (v.abs()[..., None] - _E2M1).abs().argmin(-1) + 8 * (v < 0)
    code = code.view(N, K).to(torch.uint8)
    return (code[:, 0::2] | (code[:, 1::2] << 4)).view(torch.int8), scale.to(torch.float8_e8m0fnu)


@torch.no_grad()
def test_fp8_and_fp4_checkpoints_load(native, tmp_path):
    """The released format: FP8 e4m3 projections with `.scale` (e8m0, 128×128 blocks) and FP4 routed experts
    (`expert_dtype: fp4`, int8 nibbles, a scale per 32) load dequantized to the logits of the dequantized weights;
    transformers' FP8 spelling (`weight_scale_inv`, fp32) too."""
    model, _ = native
    tensors = _released_tensors(model)
    ref = {}
    for n in list(tensors):
        t = tensors[n]
        if re.search(r"\.experts\.\d+\.w[123]\.weight$", n):
            q, s = _fp4_blocks(t)
            tensors[n], tensors[n.removesuffix("weight") + "scale"] = q, s
            b = q.view(torch.uint8).long()
            ref[n] = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, 0, -.5, -1, -1.5, -2, -3, -4, -6])[
                torch.stack([b & 15, b >> 4], -1)].flatten(1) * s.float().repeat_interleave(32, 1)
        elif re.search(r"attn\.(wq_a|wq_b|wkv|wo_a|wo_b)\.weight$|shared_experts\.w[123]\.weight$|[eh]_proj\.weight$", n):
            q, s = _fp8_blocks(t)
            scale_name = n.removesuffix("weight") + "scale" if "layers.1." not in n else n + "_scale_inv"
            tensors[n], tensors[scale_name] = q, (s if scale_name.endswith(".scale") else s.float())
            ref[n] = q.float() * s.float().repeat_interleave(128, 0)[: t.shape[0]].repeat_interleave(128, 1)[:, : t.shape[1]]
    assert any(k.endswith("weight_scale_inv") for k in tensors) and any(v.dtype == torch.int8 for v in tensors.values())
    cfg = {**RELEASED, "expert_dtype": "fp4", "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                                      "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}}
    loaded = load_model(_write(tmp_path / "fp8", tensors, cfg), dtype="fp32", progress=False)
    assert loaded.config.expert_dtype == "fp4"
    want_model = load_model(_write(tmp_path / "deq", {**_released_tensors(model), **ref}, RELEASED), dtype="fp32",
                            progress=False)
    ids = _ids(1, 24, 4)
    want = want_model(ids)
    assert (loaded(ids) - want).abs().max().item() <= 1e-5
    assert (want - model(ids)).abs().max().item() > 1e-3  # the rounding was real
