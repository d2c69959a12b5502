"""The DeepSeek-V3 family's declarations (no model code is imported here): deepseek_v3, and kimi_k2 (its
architecture at another size)."""

from __future__ import annotations

from typing import Any

from dsv3.models.family import ModelFamily

MLA_TARGETS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
V3_ROUTER = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True}


def v3_family(model_type: str, architecture: str, defaults: dict[str, Any], config_parser: str | None = None) -> ModelFamily:
    """A family served by this package's code: the V3 network, its checkpoint names and parallel layout."""
    return ModelFamily(model_type, architecture, "dsv3.models.deepseek_v3.model:DeepseekV3ForCausalLM",
                       "dsv3.models.deepseek_v3.weights", "dsv3.models.deepseek_v3.shard:parallelize",
                       defaults, MLA_TARGETS + MLP_TARGETS, MLP_TARGETS, config_parser)


FAMILIES = [v3_family("deepseek_v3", "DeepseekV3ForCausalLM", V3_ROUTER),
            v3_family("kimi_k2", "DeepseekV3ForCausalLM", V3_ROUTER)]
