"""Expert load balancing the DeepSeek-V3 way.

Auxiliary-loss-free balancing (arXiv 2408.15664, V3 report §2.1.2): every routed MoE layer
counts the tokens each expert received during an optimizer step; before the step the router's
`e_score_correction_bias` moves by +γ for underloaded and −γ for overloaded experts. The bias
is a buffer, so no gradient ever reaches it, and the router adds it for expert *selection*
only — gating weights still come from the unbiased scores (see `dsv3.layers.moe.Gate`).

The optional sequence-wise balance loss α·Σ_i f_i·P_i (V3 eq. 17–20) keeps single sequences
from collapsing onto few experts; V3 uses a tiny α (1e-4).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3.layers.moe import LoadTracking


def moe_layers(model: nn.Module) -> list[LoadTracking]:
    """Every MoE module in model order, MTP blocks included (they route too): V2/V3's and V4's alike."""
    return [m for m in model.modules() if isinstance(m, LoadTracking)]


def track_load(moes: list[LoadTracking], on: bool) -> None:
    """Switch counting of per-expert tokens (and keeping the last routing) on or off."""
    for m in moes:
        m.track_load = on
        if not on:
            m.last_routing = None


def load_stats(moes: list[LoadTracking]) -> list[float]:
    """max/mean expert load per MoE layer from the counts gathered so far (1.0 = perfect balance)."""
    out = []
    for m in moes:
        load = m.expert_load.float()
        out.append(float(load.max() / load.mean()) if load.sum() > 0 else 1.0)
    return out


@torch.no_grad()
def update_bias(moes: list[LoadTracking], gamma: float) -> None:
    """bias_i += γ·sign(mean load − load_i) from this step's counts, then reset the counts.

    Experts with exactly the mean load keep their bias (sign 0), as in Megatron's update. Under
    DDP the counts would be all-reduced first so every rank moves the bias identically.
    """
    for m in moes:
        bias = getattr(m.gate, "e_score_correction_bias", None)  # None: no bias to move (V4's hash-routed layers)
        load = m.expert_load.float()
        if bias is not None and gamma > 0 and load.sum() > 0:
            bias += gamma * torch.sign(load.mean() - load).to(bias.dtype)
        m.expert_load.zero_()


def sequence_balance_loss(moes: list[LoadTracking], batch: int) -> torch.Tensor:
    """Σ_i f_i·P_i per sequence, averaged over sequences and summed over MoE layers (unscaled by α).

    f_i = E/(K·T)·#{t : expert i in token t's top-K}, P_i = mean_t of s_i,t / Σ_j s_j,t, with s
    the router's unbiased scores; both use the routing of each layer's latest forward, whose
    tokens are `batch` sequences of equal length.
    """
    total = None
    for m in moes:
        if m.last_routing is None:
            continue
        scores, idx = m.last_routing
        E, K = scores.shape[-1], idx.shape[-1]
        scores = scores.view(batch, -1, E)  # the MTP block sees one token fewer per sequence
        chosen = torch.zeros_like(scores).scatter_(2, idx.view(batch, -1, K), 1.0)
        f = chosen.mean(1) * (E / K)                                         # [B, E]
        p = (scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)).mean(1)  # [B, E]
        term = (f * p).sum(-1).mean()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("sequence_balance_loss needs MoE layers with load tracking on")
    return total
