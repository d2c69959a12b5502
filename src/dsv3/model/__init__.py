"""The DeepSeek-V3 model: MLA attention, DeepSeekMoE, multi-token prediction, YaRN RoPE."""

from dsv3.model.attention import AttentionContext, DenseLatentCache
from dsv3.model.transformer import DeepseekV3ForCausalLM

__all__ = ["AttentionContext", "DenseLatentCache", "DeepseekV3ForCausalLM"]
