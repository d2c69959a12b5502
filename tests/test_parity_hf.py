"""Logit and greedy-generation parity with HF transformers' DeepseekV3/V2ForCausalLM (fp32)."""

from __future__ import annotations

import pytest
import torch

from dsv3.io.load import load_model
from dsv3.attention import AttentionContext, DenseLatentCache
from hf_oracle import CONFIGS, build_hf_model

T, PAD = 64, 9  # prompt length; the second row is left-padded by PAD tokens


def _batch(vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :PAD] = 0
    ids[1, :PAD] = 2
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    hf = build_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    ours = load_model(path, dtype=torch.float32, progress=False)
    return request.param, hf, ours


def test_config_coverage():
    """The parity configs together cover every axis the model-foundation issue lists."""
    specs = CONFIGS.values()
    assert {s["q_lora_rank"] is None for s in specs} == {True, False}
    assert {s["rope_parameters"]["rope_type"] for s in specs} == {"yarn", "default"}
    assert {s.get("n_group", 1) > 1 for s in specs} == {True, False}
    assert {s["model_type"] for s in specs} == {"deepseek_v3", "deepseek_v2"}
    assert {s["first_k_dense_replace"] > 0 for s in specs} == {True, False}
    assert {s.get("tie_word_embeddings", False) for s in specs} == {True, False}


@torch.no_grad()
def test_logits_match_hf_with_left_padding(pair):
    name, hf, ours = pair
    ids, mask, pos = _batch(hf.config.vocab_size)
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    got = ours(ids, pos, AttentionContext.causal(mask))
    valid = mask.bool()
    diff = (ref - got).abs()[valid].max().item()
    assert diff <= 1e-4, f"{name}: max |logit diff| {diff:.2e}"
    assert ref[valid].abs().max() > 0.1  # the oracle's logits are not degenerate


@torch.no_grad()
def test_absorbed_decode_equals_expanded(pair):
    name, _, ours = pair
    ids, mask, pos = _batch(ours.config.vocab_size, seed=2)
    outs = {}
    for impl in ("naive", "absorb"):
        cache = DenseLatentCache(ours.config.num_hidden_layers, 2, T + 4, ours.config.latent_dim, torch.float32, impl=impl)
        cache.set_padding(mask[:, :-4])
        first = ours(ids[:, :-4], pos[:, :-4], cache)
        steps = [ours(ids[:, i:i + 1], pos[:, i:i + 1], cache) for i in range(T - 4, T)]
        outs[impl] = torch.cat([first] + steps, dim=1)
    full = ours(ids, pos, AttentionContext.causal(mask))
    valid = mask.bool()
    assert (outs["absorb"] - outs["naive"]).abs()[valid].max() <= 1e-5
    assert (outs["absorb"] - full).abs()[valid].max() <= 1e-5


@torch.no_grad()
def test_greedy_32_tokens_match_hf(pair):
    """32 greedy tokens equal HF's; a divergence is excused only at a numerical tie (oracle top-2 gap < 1e-4)."""
    name, hf, ours = pair
    ids, mask, pos = _batch(hf.config.vocab_size, seed=3)
    seqs = ids.clone()
    cache = DenseLatentCache(ours.config.num_hidden_layers, 2, T + 32, ours.config.latent_dim, torch.float32)
    cache.set_padding(mask)
    logits = ours(ids, pos, cache)[:, -1]
    cur = pos[:, -1:]
    ref_seq, ref_mask = ids.clone(), mask.clone()
    for step in range(32):
        ours_next = logits.argmax(-1)
        full_mask = torch.cat([ref_mask, torch.ones(2, step, dtype=torch.long)], 1) if step else ref_mask
        ref_logits = hf(input_ids=seqs, attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
        ref_next = ref_logits.argmax(-1)
        for b in range(2):
            if ours_next[b] != ref_next[b]:
                top2 = ref_logits[b].topk(2).values
                gap = (top2[0] - top2[1]).item()
                assert gap < 1e-4, f"{name}: token {step} of row {b} differs from HF with top-2 gap {gap:.2e}"
                pytest.skip(f"numerical tie at step {step} (gap {gap:.1e}); prefix matched")
        seqs = torch.cat([seqs, ours_next[:, None]], 1)
        cur = cur + 1
        logits = ours(ours_next[:, None], cur, cache)[:, -1]
