"""The batching engine: continuous batching over a paged MLA latent cache with prefix caching."""

from dsv3.engine.llm_engine import EngineConfig, LLMEngine, RequestError

__all__ = ["EngineConfig", "LLMEngine", "RequestError"]
