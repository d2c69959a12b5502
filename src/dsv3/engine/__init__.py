"""The batching engine: continuous batching over a paged MLA latent cache with prefix caching."""

from dsv3.engine.llm_engine import EngineConfig, EngineDeadError, LLMEngine, RequestError, RequestFailedError

__all__ = ["EngineConfig", "EngineDeadError", "LLMEngine", "RequestError", "RequestFailedError"]
