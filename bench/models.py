"""The random DeepSeek-V3-shaped bench model ("bench73m") of ../shared/reference/bench-anchors.md, made with HF transformers."""

from __future__ import annotations

from pathlib import Path

BENCH73M = dict(
    vocab_size=32000, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256, num_hidden_layers=6,
    num_attention_heads=8, num_key_value_heads=8, n_shared_experts=1, n_routed_experts=16, num_experts_per_tok=4,
    n_group=4, topk_group=2, routed_scaling_factor=2.5, kv_lora_rank=128, q_lora_rank=192, qk_rope_head_dim=32,
    qk_nope_head_dim=64, v_head_dim=64, first_k_dense_replace=1, max_position_embeddings=4096,
    bos_token_id=0, eos_token_id=1,
)


def make_bench_model(path: Path, seed: int = 0, **overrides) -> Path:
    """Write the bench model (random weights, fp32) with HF's save_pretrained, plus a byte-level tokenizer."""
    import torch
    import transformers

    path = Path(path)
    if (path / "config.json").exists():
        return path
    cfg = transformers.DeepseekV3Config(**{**BENCH73M, **overrides})
    torch.manual_seed(seed)
    transformers.DeepseekV3ForCausalLM(cfg).save_pretrained(path)
    _write_tokenizer(path, cfg.vocab_size)
    return path


def _write_tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-level BPE over the stdlib, padded to the model's vocabulary (special tokens at 0/1)."""
    import sysconfig

    from dsv3.data.tokenizer_train import train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:60]
    train_tokenizer(files, min(vocab_size, 8192), path, show_progress=False)
