"""Estimators behind every number `dsv3 eval` prints.

A score without its sampling error invites over-reading a one-point difference, so each
task reports a standard error next to its mean, computed the way lm-evaluation-harness does
(`sample_stddev / sqrt(n)`), and HumanEval uses the unbiased pass@k estimator of Chen et al.
(2021) instead of the biased "fraction of problems with a pass among the first k samples".
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with `n` samples of which `c` passed: 1 - C(n-c,k)/C(n,k).

    Computed as a product (as in openai/human-eval) so large `n` does not overflow.
    """
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; NaN for an empty list so an empty subset is visible, not zero."""
    return float(sum(values) / len(values)) if len(values) else math.nan


def sample_stddev(values: Sequence[float]) -> float:
    """Standard deviation with Bessel's correction (lm-eval's `sample_stddev`)."""
    n = len(values)
    if n < 2:
        return math.nan
    mu = mean(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1))


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean of i.i.d. per-item scores (lm-eval's `mean_stderr`)."""
    n = len(values)
    return sample_stddev(values) / math.sqrt(n) if n >= 2 else math.nan


def macro_stderr(stderrs: Sequence[float]) -> float:
    """Standard error of an unweighted mean of independent group means: sqrt(sum se_i^2) / G."""
    finite = [s for s in stderrs if not math.isnan(s)]
    if not finite or len(finite) != len(stderrs):
        return math.nan
    return math.sqrt(sum(s * s for s in finite)) / len(finite)
