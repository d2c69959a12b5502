"""Learning-rate and MTP-weight schedules as pure functions of the optimizer step.

Keeping them pure (no hidden counters) is what makes resume exact: the scheduler's only state
is the step, which the checkpoint already stores.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """LR multiplier: linear warm-up from 1/warmup to 1, then cosine decay to `min_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                   min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `warmup_cosine`; its state_dict is just the step count."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup_steps, total_steps, min_ratio))


def piecewise(schedule: float | Sequence[Sequence[float]], step: int) -> float:
    """A constant, or `[[step0, value0], [step1, value1], ...]`: the value of the last entry whose
    step is <= `step` (V3 trains with λ = 0.3, then 0.1 for the last third)."""
    if isinstance(schedule, (int, float)):
        return float(schedule)
    value = float(schedule[0][1])
    for start, v in schedule:
        if step >= start:
            value = float(v)
    return value
