"""What the engine, trainers and tools need from a causal LM, whatever its family (`CausalLM`).

The DeepSeek-V3 family's `DeepseekV3ForCausalLM` implements it; a new family's model implements the
same methods and the rest of dsv3 works with it unchanged.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from dsv3.attention.spec import CacheSpec
from dsv3.config import ModelConfig


@runtime_checkable
class CausalLM(Protocol):
    config: ModelConfig
    lm_head: Any

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def num_mtp_layers(self) -> int:
        """MTP modules loaded (0: no speculative decoding)."""

    def cache_specs(self) -> list[CacheSpec]:
        """One spec per attention layer (MTP layers after the main ones): what it caches per token."""

    def dense_cache(self, batch: int, max_len: int) -> Any:
        """A contiguous cache (an attention context) for `batch` sequences of up to `max_len` positions."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, ctx: Any = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V]."""

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, ctx: Any = None) -> torch.Tensor:
        """input_ids [B, T] -> final-norm hidden states [B, T, D]."""

    def step(self, input_ids: torch.Tensor, positions: torch.Tensor | None, ctx: Any,
             rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The engine's step: (hidden states of every token, logits of the flattened `rows`)."""

    def mtp_hidden(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, ctx: Any = None,
                   depth: int = 0) -> torch.Tensor:
        """MTP module `depth` on (hidden state at position i, token i + 1)."""

    def training_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                        ctx: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the LM head reads [B, T, D], what the first MTP module takes): the trainer's forward."""

    def mtp_head_hidden(self, h: torch.Tensor, depth: int = 0) -> torch.Tensor:
        """MTP module `depth`'s output -> what the shared LM head reads."""
