"""The DeepSeek-V3.2 family's declaration: the V3 network with DSA, V3's router, the indexer's config fields.

config.json as released (`index_n_heads`, `index_head_dim`, `index_topk`) and as transformers writes it
(plus `layer_types` = "indexed_attention" per layer and `mlp_layer_types`, dense then sparse).
"""

from __future__ import annotations

from typing import Any

from dsv3.errors import ConfigError
from dsv3.models.deepseek_v3.family import V3_ROUTER, v3_family


def _positive(raw: dict[str, Any], key: str, default: int) -> int:
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"config.json: field '{key}' must be a positive integer, got {v!r}")
    return v


def parse(raw: dict[str, Any], fields: dict[str, Any]) -> None:
    """The indexer's fields (the released defaults where silent) and the layer patterns HF writes."""
    fields["index_n_heads"] = _positive(raw, "index_n_heads", 64)
    fields["index_head_dim"] = _positive(raw, "index_head_dim", 128)
    fields["index_topk"] = _positive(raw, "index_topk", 2048)
    fields["index_fp8"] = bool(raw.get("index_fp8", False))
    if fields["index_head_dim"] < fields["qk_rope_head_dim"]:
        raise ConfigError(f"config.json: 'index_head_dim' ({fields['index_head_dim']}) is smaller than "
                          f"'qk_rope_head_dim' ({fields['qk_rope_head_dim']}): the indexer rotates that many values")
    if fields["q_lora_rank"] is None:
        raise ConfigError("config.json: DeepSeek-V3.2 needs 'q_lora_rank' (the indexer reads the compressed query)")
    L = fields["num_hidden_layers"]
    types = raw.get("layer_types")
    if types is not None and (not isinstance(types, list) or any(t != "indexed_attention" for t in types)):
        raise ConfigError(f"config.json: 'layer_types' must list 'indexed_attention' for every layer, got {types!r}")
    mlp = raw.get("mlp_layer_types")
    if mlp is not None:
        dense = fields["first_k_dense_replace"] if "first_k_dense_replace" in raw else \
            next((i for i, t in enumerate(mlp) if t != "dense"), len(mlp))
        want = ["dense"] * min(dense, L) + ["sparse"] * (L - min(dense, L))
        if list(mlp) != want:
            raise ConfigError(f"config.json: 'mlp_layer_types' must be {dense} 'dense' then 'sparse' layers "
                              f"(first_k_dense_replace), got {mlp!r}")
        fields["first_k_dense_replace"] = dense


FAMILIES = [v3_family("deepseek_v32", "DeepseekV32ForCausalLM", V3_ROUTER, config_parser="dsv3.models.deepseek_v32.family:parse")]
