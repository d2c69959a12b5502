"""DeepSeek-V3: MLA attention, DeepSeekMoE, multi-token prediction, YaRN RoPE (also V2, Moonlight, Kimi-K2)."""

from dsv3.models.deepseek_v3.model import DeepseekV3ForCausalLM

__all__ = ["DeepseekV3ForCausalLM"]
