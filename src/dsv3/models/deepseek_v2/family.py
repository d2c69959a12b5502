"""The DeepSeek-V2 family's declaration: the V3 network, V2's router defaults and architecture name."""

from __future__ import annotations

from dsv3.models.deepseek_v3.family import v3_family

FAMILIES = [v3_family("deepseek_v2", "DeepseekV2ForCausalLM",
                      {"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False})]
