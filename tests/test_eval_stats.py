"""Estimators and scoring windows of `dsv3 eval`, checked against closed forms and brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dsv3.eval.stats import macro_stderr, mean_stderr, pass_at_k
from dsv3.eval.windows import text_windows, token_windows


@pytest.mark.parametrize("n,c,k,expected", [
    (10, 3, 1, 0.3),                                    # pass@1 = c/n
    (10, 3, 5, 1 - math.comb(7, 5) / math.comb(10, 5)),  # = 1 - 21/252
    (10, 0, 1, 0.0),
    (10, 10, 10, 1.0),
    (5, 3, 3, 1.0),                                     # n - c < k: every k-subset holds a pass
    (200, 13, 10, 1 - math.comb(187, 10) / math.comb(200, 10)),
])
def test_pass_at_k_matches_closed_form(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_fraction_of_k_subsets_with_a_pass():
    """Brute force: the unbiased estimator is the share of k-subsets of the n samples holding a pass."""
    n = 7
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_mean_stderr_hand_computed_and_numpy():
    assert mean_stderr([1, 0, 1, 1]) == pytest.approx(0.25)  # sd (ddof=1) = 0.5, / sqrt(4)
    xs = np.random.default_rng(0).random(50)
    assert mean_stderr(list(xs)) == pytest.approx(xs.std(ddof=1) / math.sqrt(50))
    assert math.isnan(mean_stderr([1.0]))


def test_macro_stderr():
    assert macro_stderr([0.3, 0.4]) == pytest.approx(0.25)  # sqrt(0.09 + 0.16) / 2
    assert math.isnan(macro_stderr([0.1, math.nan]))


def lm_eval_rolling_windows(tokens, prefix, max_seq_len, context_len):
    """lm-evaluation-harness `get_rolling_token_windows`, rewritten here as the reference."""
    pred_len = max_seq_len - context_len + 1
    predicted = 0
    first = min(max_seq_len, len(tokens))
    yield [prefix] + tokens[: first - 1], tokens[:first]
    predicted += first
    while predicted < len(tokens):
        wlen = min(len(tokens) - predicted, pred_len)
        end = predicted + wlen
        yield tokens[end - max_seq_len - 1: end - 1], tokens[end - wlen: end]
        predicted += wlen


@pytest.mark.parametrize("n,window,stride", [(1, 4, 3), (10, 4, 2), (37, 8, 7), (37, 8, 1), (5, 16, 8), (64, 9, 4)])
def test_token_windows_score_every_token_once_with_context(n, window, stride):
    ids = list(range(100, 100 + n))
    scored = []
    for seq, k in token_windows(ids, -1, window, stride):
        assert 1 <= k <= len(seq) - 1 and len(seq) <= window
        full = [-1] + ids
        end = full.index(seq[-1]) + 1
        assert full[end - len(seq):end] == seq  # a window is a contiguous run ending at its last scored token
        scored += seq[len(seq) - k:]
    assert scored == ids


def test_token_windows_reproduce_lm_eval_disjoint_windows():
    """With stride = window - 1 the windows are lm-eval's rolling windows (max_seq_len = window - 1, context_len=1)."""
    ids = list(range(1, 30))
    ours = list(token_windows(ids, 0, 8, 7))
    theirs = list(lm_eval_rolling_windows(ids, 0, 7, 1))
    assert len(ours) == len(theirs) == 5
    for (seq, k), (ctx, pred) in zip(ours, theirs):
        assert seq == ctx + [pred[-1]] and k == len(pred)  # same model input, same predicted tokens


def test_text_windows_partition_the_text_at_whitespace():
    text = " ".join(f"word{i}" for i in range(200))
    windows = text_windows(text, 60, 25)
    assert windows[0][:2] == (0, 0) and windows[-1][2] == len(text)
    for (s0, f0, e0), (s1, f1, e1) in zip(windows, windows[1:]):
        assert f1 == e0 and s1 < f1 < e1 and e1 - s1 <= 60
        assert text[f1].isspace()  # never splits a word
