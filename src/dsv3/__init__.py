"""dsv3: DeepSeek-V3 end to end — run, serve, shrink, adapt, train and measure MLA + MoE + MTP models."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "ModelConfig", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import dsv3` (e.g. for the CLI's --help) does not import torch eagerly.
    if name in ("LLM", "SamplingParams"):
        from dsv3 import llm

        return getattr(llm, name)
    if name == "ModelConfig":
        from dsv3.config import ModelConfig

        return ModelConfig
    raise AttributeError(name)
