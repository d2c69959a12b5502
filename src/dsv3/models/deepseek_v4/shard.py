"""DeepSeek-V4 under tensor / expert parallelism: not laid out yet, so asking for it is a clear error, not a
wrong answer (the compressors, indexer and mHC mixing need their own split)."""

from __future__ import annotations

from typing import Any

from dsv3.errors import ConfigError


def parallelize(model: Any, pc: Any) -> Any:
    raise ConfigError("tensor/expert parallelism is not supported for DeepSeek-V4 yet; run it in one process")
