"""Attention over caches: the contexts a layer attends through (no cache, contiguous, paged)."""

from dsv3.attention.context import AttentionContext, DenseLatentCache

__all__ = ["AttentionContext", "DenseLatentCache"]
