"""The memory-bandwidth bound on batch-1 decode: weight bytes read per token ÷ measured streaming bandwidth.

At batch 1 every active weight is read once per token, so no engine can decode faster than
bandwidth / bytes-per-token. The bench prints this bound beside dsv3 and the anchors, so a ratio
target can be checked against what the machine allows.
"""

from __future__ import annotations

import time

import torch


def decode_weight_bytes(model) -> int:
    """Bytes of weights one plain decode step reads: all but the unused experts, the MTP modules and
    the embedding table (one row is gathered; when tied to the LM head it is read there in full)."""
    active = model.num_parameters(active=True)
    mtp = sum(p.numel() for p in model.model.mtp.parameters())
    embed = 0 if model.config.tie_word_embeddings else model.model.embed_tokens.weight.numel()
    return (active - mtp - embed) * model.model.embed_tokens.weight.element_size()


def stream_bandwidth(threads: int, total_mb: int = 1024, rounds: int = 3) -> float:
    """GB/s of fp32 matrix-vector products over `total_mb` of distinct matrices (larger than the caches),
    best of `rounds` passes, on `threads` threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        mats = [torch.randn(8192, 2048) for _ in range(max(1, total_mb // 64))]
        x = torch.randn(2048)
        best = 0.0
        for _ in range(rounds + 1):
            t = time.perf_counter()
            for m in mats:
                torch.mv(m, x)
            best = max(best, sum(m.numel() * 4 for m in mats) / (time.perf_counter() - t) / 1e9)
        return best
    finally:
        torch.set_num_threads(old)
