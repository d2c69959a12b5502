"""The chunked LM-head cross-entropy against `F.cross_entropy` on materialized logits."""

import pytest
import torch
import torch.nn.functional as F

from dsv3.data.packing import IGNORE_INDEX
from dsv3.train.fused_ce import linear_cross_entropy


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 37, 24, generator=g, dtype=torch.float64)
    w = torch.randn(101, 24, generator=g, dtype=torch.float64) * 0.3
    t = torch.randint(0, 101, (2, 37), generator=g)
    t[0, :5] = IGNORE_INDEX
    t[1, -3:] = IGNORE_INDEX
    return h, w, t


def _reference(h, w, t):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = F.cross_entropy((h @ w.t()).flatten(0, 1), t.flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [7, 16, 1000])
def test_loss_and_gradients_match_materialized_logits(chunk):
    h, w, t = _case()
    ref_loss, ref_gh, ref_gw = _reference(h, w, t)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(hh, ww, t, chunk=chunk)
    (2.5 * loss).backward()  # the upstream gradient scales both stored gradients
    assert torch.allclose(loss, ref_loss, atol=1e-12)
    assert torch.allclose(hh.grad, 2.5 * ref_gh, atol=1e-12) and torch.allclose(ww.grad, 2.5 * ref_gw, atol=1e-12)
    assert hh.grad[0, :5].abs().max() == 0  # ignored positions get no gradient
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(h, w, t, chunk=chunk), ref_loss, atol=1e-12)


def test_bf16_matmuls_stay_close_and_all_ignored_is_zero():
    h, w, t = (x.float() if x.is_floating_point() else x for x in _case(1))
    ref_loss, ref_gh, _ = _reference(h, w, t)
    hh = h.clone().requires_grad_()
    loss = linear_cross_entropy(hh, w, t, chunk=16, dtype=torch.bfloat16)
    loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 2e-2 * ref_loss.item()
    assert torch.nn.functional.cosine_similarity(hh.grad.flatten(), ref_gh.flatten(), dim=0) > 0.99
    none = torch.full_like(t, IGNORE_INDEX)
    assert linear_cross_entropy(h.clone().requires_grad_(), w, none).item() == 0.0
