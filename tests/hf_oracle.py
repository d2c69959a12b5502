"""Random DeepSeek-V2/V3 models built with HF transformers, the independent oracle for parity tests."""

from __future__ import annotations

from pathlib import Path

import torch

# Small shapes that still exercise every code path (dims keep 16-byte alignment for grouped_mm).
BASE = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, max_position_embeddings=512,
    bos_token_id=0, eos_token_id=1, pad_token_id=2, initializer_range=0.1,
)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}

CONFIGS: dict[str, dict] = {
    # V3 router (sigmoid, noaux_tc, groups), compressed queries, YaRN, one dense layer, MTP.
    "v3_yarn_groups": dict(model_type="deepseek_v3", q_lora_rank=24, n_group=4, topk_group=2, first_k_dense_replace=1,
                           routed_scaling_factor=2.5, rope_parameters=YARN, num_nextn_predict_layers=1),
    # Moonlight-style: no query compression, plain RoPE, one group, no dense prefix, tied embeddings.
    "v3_plain_tied": dict(model_type="deepseek_v3", q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=0,
                          routed_scaling_factor=1.5, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
                          rms_norm_eps=1e-5, num_nextn_predict_layers=0),
    # V2-Lite-style: softmax/greedy routing, no query compression, YaRN with mscale 0.707.
    "v2_greedy_yarn": dict(model_type="deepseek_v2", q_lora_rank=None, topk_method="greedy", norm_topk_prob=False,
                           first_k_dense_replace=1, rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}),
    # V2-style group-limited softmax routing with compressed queries, tied embeddings.
    "v2_group_limited": dict(model_type="deepseek_v2", q_lora_rank=24, topk_method="group_limited_greedy", n_group=4,
                             topk_group=2, norm_topk_prob=False, first_k_dense_replace=0, routed_scaling_factor=2.0,
                             tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


def build_hf_model(name: str, seed: int = 0, **overrides):
    """A random HF model for CONFIGS[name]; router biases are made non-zero so they matter."""
    import transformers

    spec = {**BASE, **CONFIGS[name], **overrides}
    kind = spec.pop("model_type")
    cls_cfg, cls_model = ((transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM) if kind == "deepseek_v3"
                          else (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM))
    n_mtp = spec.pop("num_nextn_predict_layers", 0)
    cfg = cls_cfg(**spec)
    if kind == "deepseek_v3":
        cfg.num_nextn_predict_layers = n_mtp
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls_model(cfg).eval()
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    return model


def save_hf_model(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path
