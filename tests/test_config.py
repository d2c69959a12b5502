"""ModelConfig from HF config.json: families, rope spellings, and errors that name the field."""

from __future__ import annotations

import math

import pytest

from dsv3.config import ModelConfig
from dsv3.errors import ConfigError

V3 = dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
          num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
          qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8,
          topk_group=4, routed_scaling_factor=2.5, first_k_dense_replace=3, moe_layer_freq=1, scoring_func="sigmoid",
          topk_method="noaux_tc", norm_topk_prob=True, num_nextn_predict_layers=1, rms_norm_eps=1e-6, rope_theta=10000,
          max_position_embeddings=163840, tie_word_embeddings=False,
          rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})


def test_deepseek_v3_671b_numbers():
    cfg = ModelConfig.from_dict(V3)
    assert cfg.latent_dim == 576 and cfg.qk_head_dim == 192
    assert math.isclose(cfg.softmax_scale, 0.135234, rel_tol=1e-5)  # 192^-0.5 · (0.1·ln 40 + 1)²
    assert not cfg.is_moe_layer(2) and cfg.is_moe_layer(3) and cfg.is_moe_layer(60)


def test_rope_parameters_spelling_equals_classic():
    new = {k: v for k, v in V3.items() if k not in ("rope_scaling", "rope_theta")}
    new["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, **{k: v for k, v in V3["rope_scaling"].items() if k != "type"}}
    assert ModelConfig.from_dict(new).rope_scaling == ModelConfig.from_dict(V3).rope_scaling
    assert ModelConfig.from_dict(new).rope_theta == 10000.0


def test_families_and_variants():
    k2 = ModelConfig.from_dict({**V3, "model_type": "kimi_k2", "n_routed_experts": 384, "n_group": 1, "topk_group": 1})
    assert k2.scoring_func == "sigmoid" and k2.n_group == 1
    lite = {**V3, "model_type": "deepseek_v2", "q_lora_rank": None, "n_routed_experts": 64, "num_experts_per_tok": 6,
            "n_group": 1, "topk_group": 1, "rope_scaling": None}
    for k in ("scoring_func", "topk_method", "norm_topk_prob"):
        lite.pop(k)
    v2 = ModelConfig.from_dict(lite)
    assert (v2.q_lora_rank, v2.scoring_func, v2.topk_method, v2.norm_topk_prob, v2.rope_scaling) == (None, "softmax", "greedy", False, None)
    sparse = ModelConfig.from_dict({**V3, "first_k_dense_replace": 1, "moe_layer_freq": 2})
    assert [sparse.is_moe_layer(i) for i in range(5)] == [False, False, True, False, True]


def test_round_trip_through_to_dict():
    cfg = ModelConfig.from_dict(V3)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("change, field", [
    ({"model_type": "llama"}, "model_type"),
    ({"kv_lora_rank": None}, "kv_lora_rank"),
    ({"hidden_size": -4}, "hidden_size"),
    ({"topk_group": 9}, "topk_group"),
    ({"n_group": 7}, "n_group"),
    ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
    ({"num_experts_per_tok": 160}, "num_experts_per_tok"),  # more than 4 groups × 32 experts can supply
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"topk_method": "random"}, "topk_method"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling"),
    ({"rope_scaling": {"type": "yarn", "factor": 40}}, "original_max_position_embeddings"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5.0e4, "factor": 40, "original_max_position_embeddings": 4096}}, "rope_theta"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_bad_fields_are_named(change, field):
    raw = {**V3, **change}
    if change.get(field, 0) is None or field == "kv_lora_rank":
        raw.pop(field, None)
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(raw)


def test_q_lora_rank_must_be_present():
    raw = dict(V3)
    del raw["q_lora_rank"]
    with pytest.raises(ConfigError, match="q_lora_rank"):
        ModelConfig.from_dict(raw)
