"""DeepSeek-V3 (and R1, V3.1, Moonlight, Kimi-K2): MLA attention, DeepSeekMoE with auxiliary-loss-free routing,
multi-token prediction, YaRN RoPE. `model` holds the network, `weights` the checkpoint names, `shard` the
tensor/expert-parallel layout, `family` the registry's declarations (`dsv3.models.registry`)."""

from __future__ import annotations


def __getattr__(name: str):
    if name == "DeepseekV3ForCausalLM":  # lazy: importing the package (the registry does) must not import the model
        from dsv3.models.deepseek_v3.model import DeepseekV3ForCausalLM

        return DeepseekV3ForCausalLM
    raise AttributeError(name)


__all__ = ["DeepseekV3ForCausalLM"]
