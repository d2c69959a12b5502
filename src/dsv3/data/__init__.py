"""Pretraining data: build deduplicated token shards, read them memory-mapped, pack windows.

`build` (heavy: tokenizers) is imported on first use so that training code importing the
reader and the packer does not pay for it.
"""

from dsv3.data.fim import FIMTokens, cut_lines, fim_context, fim_lines_context, fim_transform
from dsv3.data.packing import DataMix, PackedBatch, PackedDataset
from dsv3.data.shards import DataError, TokenShards, load_manifest

__all__ = ["DataError", "DataMix", "FIMTokens", "PackedBatch", "PackedDataset", "TokenShards", "build", "cut_lines", "fim_context", "fim_lines_context", "fim_transform", "load_manifest"]


def build(*args, **kwargs) -> dict:
    """See `dsv3.data.builder.build`."""
    from dsv3.data.builder import build as _build
    return _build(*args, **kwargs)
