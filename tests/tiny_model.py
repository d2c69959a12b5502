"""A tiny random DeepSeek-V3 model directory (weights + tokenizer) built in-test with dsv3's own code."""

from __future__ import annotations

from pathlib import Path

import torch

from dsv3.io.checkpoint import save_model
from dsv3.config import ModelConfig
from dsv3.models.deepseek_v3 import DeepseekV3ForCausalLM
from dsv3.io.tokenizer import Tokenizer
from tiny_tokenizer import make_tiny_tokenizer

TINY = dict(
    model_type="deepseek_v3", hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1,
    routed_scaling_factor=2.5, num_nextn_predict_layers=1, max_position_embeddings=1024, rms_norm_eps=1e-6,
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "mscale": 1.0, "mscale_all_dim": 1.0},
    torch_dtype="float32",
)


def make_tiny_model_dir(path: Path, seed: int = 0, **overrides) -> Path:
    """Train a tiny tokenizer into `path` and save a random model whose vocabulary matches it."""
    path = Path(path)
    make_tiny_tokenizer(path)
    tok = Tokenizer.from_dir(path)
    cfg = ModelConfig.from_dict({**TINY, "vocab_size": tok.vocab_size, "bos_token_id": tok.bos_token_id,
                                 "eos_token_id": tok.eos_token_id, **overrides})
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg)
    model.init_weights(std=0.2)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "e_score_correction_bias", None) is not None:
                m.e_score_correction_bias.normal_(0, 0.05)
    save_model(model, path)
    return path
