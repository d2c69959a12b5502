"""Hash routing (DeepSeek-V4's first `num_hash_layers` MoE layers): a fixed token -> experts table picks the experts.

Follows the official V4 inference code (`Gate` with `hash=True`) and the V4 report §2.1: the experts of token
t are `tid2eid[t]` (K ids, fixed at training time); the learned `weight` still scores them,
score = score_fn(weight · x) (sqrtsoftplus in V4), and the chosen scores, renormalised to sum 1 and times
`routed_scaling_factor`, weight the experts' outputs -- the same `run_experts` as a learned router feeds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.layers.moe import score_fn


class HashGate(nn.Module):
    """`weight` [E, D] and the table `tid2eid` [vocab, K] (int64 here; the release stores int32), checkpoint names."""

    keep_fp32 = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_experts = cfg.num_experts_per_tok, cfg.n_routed_experts
        self.scoring_func, self.scaling = cfg.scoring_func, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, cfg.num_experts_per_tok, dtype=torch.int64))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D], input_ids [N] -> (weights [N, K] fp32, expert ids [N, K], scores [N, E] fp32)."""
        scores = score_fn(self.scoring_func, F.linear(x.float(), self.weight.float()))
        idx = self.tid2eid[input_ids.reshape(-1)].long()
        weights = scores.gather(1, idx)
        if self.scoring_func != "softmax":
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, idx, scores
