"""`dsv3 pretrain` pieces: objective, MTP targets and gradients, aux-loss-free balancing, schedules.

Everything runs on a tiny DeepSeek-V3 model and shards built in-test from a few stdlib files;
end-to-end runs (resume, torchrun, CLI) are in test_pretrain_run.py.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.data import PackedDataset, TokenShards, build
from dsv3.data.packing import IGNORE_INDEX
from dsv3.models.deepseek_v3 import DeepseekV3ForCausalLM
from dsv3.layers.moe import MoE
from dsv3.train.balance import load_stats, moe_layers, sequence_balance_loss, track_load, update_bias
from dsv3.train.losses import mtp_targets, pretrain_losses
from dsv3.train.schedule import piecewise, warmup_cosine
from tiny_model import TINY
from tiny_tokenizer import make_tiny_tokenizer, stdlib_sources

MODEL = {k: v for k, v in TINY.items() if k not in ("torch_dtype",)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    src = root / "src"
    src.mkdir()
    for f in stdlib_sources():
        shutil.copy(f, src / f.name)
    make_tiny_tokenizer(root / "tok")
    build([str(src)], root / "tok", root / "shards", include=["*.py"], heldout_fraction=0.3, progress=False)
    return root


def tiny_model(shards, seed: int = 0, **overrides) -> DeepseekV3ForCausalLM:
    vocab = TokenShards(shards / "shards").vocab_size
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(ModelConfig.from_dict({**MODEL, "vocab_size": vocab, **overrides}))
    model.init_weights()
    return model


def one_batch(shards, seq_len: int = 32, batch: int = 2):
    return PackedDataset(TokenShards(shards / "shards"), seq_len, batch, seed=0).batch(0)


def test_loss_decreases_on_a_repeated_batch(shards):
    model = tiny_model(shards)
    batch = one_batch(shards)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        losses = pretrain_losses(model, batch, mtp_lambda=0.3)
        first = first if first is not None else losses.main.item()
        opt.zero_grad()
        losses.total.backward()
        opt.step()
    assert first > math.log(model.config.vocab_size) - 1.0  # starts near uniform
    assert losses.main.item() < 0.5 * first


def test_mtp_loss_present_and_its_gradient_reaches_the_mtp_module(shards):
    model = tiny_model(shards)
    batch = one_batch(shards)
    losses = pretrain_losses(model, batch, mtp_lambda=0.3)
    assert losses.mtp is not None and math.isfinite(losses.mtp.item())
    assert torch.allclose(losses.total, losses.main + 0.3 * losses.mtp)
    losses.total.backward()
    mtp = model.model.mtp[0]
    for name, p in mtp.named_parameters():
        if "experts" in name or "gate.weight" in name:
            continue  # a routed expert may receive no token in a tiny batch
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # λ = 0: the MTP term is still reported but no longer trains the MTP module.
    model.zero_grad()
    pretrain_losses(model, batch, mtp_lambda=0.0).total.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in mtp.parameters())


def test_mtp_targets_stay_inside_each_document():
    ids = torch.tensor([[10, 11, 12, 1, 20, 21, 22, 23]])  # 1 = EOS ends document 0
    labels = torch.tensor([[11, 12, 1, IGNORE_INDEX, 21, 22, 23, 24]])
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    next_ids, targets = mtp_targets(ids, labels, docs, depth=0)
    # Oracle: position i predicts token i+2 from token i+1, only when i+1 shares i's document.
    expect = [labels[0, i + 1].item() if docs[0, i + 1] == docs[0, i] else IGNORE_INDEX for i in range(7)]
    assert next_ids.tolist() == [[11, 12, 1, 20, 21, 22, 23]]
    assert targets.tolist() == [expect]
    assert expect[3] == IGNORE_INDEX and expect[2] == IGNORE_INDEX  # EOS label masked, crossing masked


def test_bias_update_moves_overloaded_down_underloaded_up(shards):
    moe = moe_layers(tiny_model(shards))[0]
    moe.expert_load.copy_(torch.tensor([40.0, 0, 10, 10, 10, 5, 5, 0]))  # mean 10
    before = moe.gate.e_score_correction_bias.clone()
    update_bias([moe], gamma=0.01)
    delta = (moe.gate.e_score_correction_bias - before).tolist()
    assert delta == pytest.approx([-0.01, 0.01, 0, 0, 0, 0.01, 0.01, 0.01])
    assert moe.expert_load.sum() == 0  # counts restart every optimizer step


def test_router_bias_gets_no_gradient_and_selects_only(shards):
    model = tiny_model(shards)
    moes = moe_layers(model)
    params = {id(p) for p in model.parameters()}
    assert all(id(m.gate.e_score_correction_bias) not in params for m in moes)
    track_load(moes, True)
    pretrain_losses(model, one_batch(shards), mtp_lambda=0.3, seq_aux_alpha=1e-2, moes=moes).total.backward()
    assert all(not m.gate.e_score_correction_bias.requires_grad and m.gate.e_score_correction_bias.grad is None
               for m in moes)
    assert all(m.gate.weight.grad is not None for m in moes)
    # Selection only: a bias that forces the choice leaves the weights = normalised unbiased scores.
    gate = moes[0].gate
    x = torch.randn(5, gate.weight.shape[1])
    gate.e_score_correction_bias.copy_(torch.tensor([5.0, 5.0, 0, 0, 0, 0, 0, 0]))
    w, idx, scores = gate(x)
    assert idx.sort(-1)[0].tolist() == [[0, 1]] * 5
    expect = scores[:, :2] / scores[:, :2].sum(-1, keepdim=True) * gate.scaling
    assert torch.allclose(w.gather(1, idx.argsort(-1)), expect)


def test_bias_balancing_evens_out_a_skewed_router():
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({**MODEL, "vocab_size": 64})
    results = {}
    for gamma in (0.0, 0.01):
        moe = MoE(cfg)
        torch.nn.init.normal_(moe.gate.weight, std=0.02)
        moe.gate.weight.data[0] += 0.05  # expert 0 attracts most tokens
        track_load([moe], True)
        gen = torch.Generator().manual_seed(1)
        for _ in range(150):
            x = torch.randn(256, cfg.hidden_size, generator=gen) + 1.0
            with torch.no_grad():
                moe.gate(x)  # routing only; counts come from the MoE forward below
                moe(x)
            stats = load_stats([moe])[0]
            update_bias([moe], gamma)
        results[gamma] = stats
    assert results[0.01] <= 1.5 < results[0.0]


def test_sequence_balance_loss_matches_its_definition():
    torch.manual_seed(0)
    B, T, E, K = 2, 6, 8, 2
    scores = torch.rand(B * T, E, requires_grad=True)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(B * T)])
    moe = type("M", (), {"last_routing": (scores, idx)})()
    got = sequence_balance_loss([moe], B)
    expect = 0.0
    for b in range(B):
        rows = range(b * T, (b + 1) * T)
        for i in range(E):
            f = E / (K * T) * sum(int(i in idx[t].tolist()) for t in rows)
            p = sum(float(scores[t, i].detach() / scores[t].detach().sum()) for t in rows) / T
            expect += f * p / B
    assert got.item() == pytest.approx(expect, rel=1e-5)
    got.backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0


def test_schedules():
    assert warmup_cosine(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 110, 0.1) == pytest.approx(0.1)
    assert piecewise(0.3, 5) == 0.3
    assert [piecewise([[0, 0.3], [100, 0.1]], s) for s in (0, 99, 100, 1000)] == [0.3, 0.3, 0.1, 0.1]
