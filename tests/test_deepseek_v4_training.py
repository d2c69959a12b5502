"""Training DeepSeek-V4 with `dsv3 pretrain`: gradients through the compressed attention's state writes equal
transformers' (the embedding and head gradients carry every layer's backward) and central differences (per parameter
group, compressors and indexer queries included); whole windows without a document mask (`doc_mask: false`), refused
with the mask; balancing counts V4's routed layers; a run's loss falls and its model loads and generates."""

from __future__ import annotations

import json

import pytest
import torch

from dsv3.attention.backend import TorchBackend
from dsv3.config import ModelConfig
from dsv3.data import PackedDataset, TokenShards
from dsv3.io.load import load_model
from dsv3.models.deepseek_v4.model import DeepseekV4ForCausalLM
from dsv3.train.balance import moe_layers, track_load, update_bias
from dsv3.train.config import PretrainConfig, PretrainConfigError
from dsv3.train.losses import pretrain_losses
from test_deepseek_v4 import HF_V4, RELEASED, _randomize
from test_pretrain import shards  # noqa: F401  (pytest fixture)


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def test_gradients_match_transformers(tmp_path):
    """20 tokens (HF's V4 is causal this short): CSA has 5 entries with top-3, so the sparse path, the compressors'
    writes into the state and the HCA entries all lie on the backward path of the embedding's gradient."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM as HF

    hf = HF(DeepseekV4Config(**HF_V4)).float()
    _randomize(hf)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype="fp32", progress=False)
    ours.train()
    hf.train()
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    loss_hf = _lm_loss(hf(ids).logits, ids)
    loss_ours = _lm_loss(ours(ids), ids)
    assert float(loss_ours.detach()) == pytest.approx(float(loss_hf.detach()), rel=1e-4)
    loss_hf.backward()
    loss_ours.backward()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        g_hf = dict(hf.named_parameters())[name].grad
        g = dict(ours.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0
        assert torch.allclose(g, g_hf, rtol=1e-3, atol=1e-6 * float(g_hf.abs().max())), name


@pytest.fixture(scope="module")
def tiny_v4():
    cfg = ModelConfig.from_dict(RELEASED)
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(cfg)
    model.reset_buffers()
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(1), every_tensor=True)
    return model


def _batch(T: int = 40, B: int = 2):
    from dsv3.data.packing import PackedBatch

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 256, (B, T + 1), generator=g)
    ids[0, 17] = 1  # an EOS inside a window: with doc_mask false it is just a token of the one sequence
    pos = torch.arange(T).expand(B, T)
    return PackedBatch(ids[:, :-1], ids[:, 1:].clone(), pos, torch.zeros(B, T, dtype=torch.long))


GROUPS = ("model.layers.1.attn.compressor.wkv.weight", "model.layers.1.attn.compressor.wgate.weight",
          "model.layers.1.attn.compressor.ape", "model.layers.2.attn.compressor.wkv.weight",
          "model.layers.3.attn.wkv.weight", "model.layers.0.attn.attn_sink", "model.layers.2.hc_attn_fn",
          "model.mtp.0.e_proj.weight", "model.mtp.0.attn.wq_a.weight")
INDEX_GROUPS = ("model.layers.1.attn.indexer.wq_b.weight", "model.layers.3.attn.indexer.weights_proj.weight",
                "model.layers.3.attn.indexer.compressor.wkv.weight")


def _objectives(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(the LM objective: next-token + λ·MTP, the indexers' KL); the KL's target is detached, so each is checked
    against differences on its own."""
    losses = pretrain_losses(model, batch, mtp_lambda=0.5, doc_mask=False)
    return losses.total - losses.index, losses.index


def test_gradients_match_central_differences(tiny_v4):
    """Per parameter group, the central difference (L(θ+εu) - L(θ-εu)) / 2ε along u = grad/|grad| equals |grad|, and
    along a random unit direction v equals <grad, v>: the LM objective (MTP term included) for the model's groups,
    the indexer objective for the indexers'. A group whose state write dropped its gradient (a compressor run under
    no_grad) would have no gradient here, or one the differences contradict."""
    model = tiny_v4.float()  # the compressors and routers compute in fp32 whatever the weights' dtype: differences in fp32
    batch = _batch()
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(7)
    for which, names in ((0, GROUPS), (1, INDEX_GROUPS)):
        model.zero_grad()
        _objectives(model, batch)[which].backward()

        def slope(p: torch.Tensor, v: torch.Tensor, eps: float = 1e-3) -> float:  # 3e-3 can flip a top-k choice
            with torch.no_grad():
                saved = p.clone()
                p += eps * v
                up = float(_objectives(model, batch)[which])
                p.copy_(saved - eps * v)
                down = float(_objectives(model, batch)[which])
                p.copy_(saved)
            return (up - down) / (2 * eps)

        for name in names:
            p = params[name]
            assert p.grad is not None and float(p.grad.norm()) > 1e-3, name
            norm = float(p.grad.norm())
            assert slope(p, p.grad / norm) == pytest.approx(norm, rel=2e-2), name
            v = torch.randn(p.shape, generator=g)
            v /= v.norm()
            assert slope(p, v) == pytest.approx(float((p.grad * v).sum()), abs=3e-4 + 2e-2 * norm), name


STEPS = 60


def test_indexer_objective_trains_the_indexer_alone(tiny_v4):
    """The KL term's gradient reaches indexer parameters only; 60 steps on it alone make the indexer's top-k hold as
    much of the main attention's mass over the entries as the best k entries do (0.37 -> 0.53 = the best here)."""
    from dsv3.models.deepseek_v4.model import visible_entries
    from dsv3.train.losses import index_layers

    model = tiny_v4.float()
    model.train()
    batch = _batch(T=64)
    layers = index_layers(model)
    assert [m.layer_idx for m in layers] == [1, 3]  # the CSA layers
    model.zero_grad()
    losses = pretrain_losses(model, batch, doc_mask=False)
    assert losses.index is not None and float(losses.index) > 0
    losses.index.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got and all(".indexer." in n for n in got), sorted(n for n in got if ".indexer." not in n)[:5]

    def coverage() -> float:
        """Share of the main attention's entry mass (layer 1) inside the indexer's top-k, over queries seeing > k."""
        layer = layers[0]
        seen = {}
        orig = layer._index_kl

        def spy(q, entries, index_keys, iq, iw, start):
            seen.update(q=q, entries=entries, ik=index_keys, iq=iq, iw=iw)
            return orig(q, entries, index_keys, iq, iw, start)
        layer._index_kl = spy
        with torch.no_grad():
            pretrain_losses(model, batch, doc_mask=False)
        del layer._index_kl
        q, ent, ik, iq, iw = (seen[k] for k in ("q", "entries", "ik", "iq", "iw"))
        T, r, k = q.shape[1], layer.ratio, layer.indexer.topk
        n = T // r
        vis = visible_entries(torch.arange(T), n, r)
        p = (torch.einsum("bthd,bnd->bthn", q, ent[:, :n]) * layer.scale).masked_fill(~vis[None, :, None], -1e30)
        p = p.softmax(-1).sum(2)
        p = p / p.sum(-1, keepdim=True)
        scores = TorchBackend().index_scores(iq, iw, ik[:, :n])
        idx, ok = TorchBackend().topk_select(scores, vis[None], k)
        held = (p.gather(-1, idx) * ok).sum(-1)
        rows = vis.sum(-1) > k
        best = p.topk(k, dim=-1).values.sum(-1)  # the most any k entries hold
        return float(held[:, rows].mean()), float(best[:, rows].mean())

    before, best = coverage()
    params = [p for n, p in model.named_parameters() if ".indexer." in n]
    saved = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(STEPS):
        opt.zero_grad()
        pretrain_losses(model, batch, doc_mask=False).index.backward()
        opt.step()
    after, _ = coverage()
    with torch.no_grad():
        for p, v in zip(params, saved):
            p.copy_(v)
    assert after > before + 0.1 and after >= 0.98 * best, (before, after, best)  # as much as any k entries hold


def test_whole_windows_equal_one_unmasked_sequence(tiny_v4):
    """doc_mask false: the loss is the plain causal LM loss of each row as one sequence (the EOS inside included)."""
    model = tiny_v4.float()
    batch = _batch()
    with torch.no_grad():
        ours = pretrain_losses(model, batch, doc_mask=False).main
        ref = torch.nn.functional.cross_entropy(model(batch.input_ids).flatten(0, 1), batch.labels.flatten())
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)
    with pytest.raises(ValueError, match="document mask is not supported"):
        pretrain_losses(model, batch, doc_mask=True)


def test_balancing_counts_and_moves_v4_routed_layers(tiny_v4):
    model = tiny_v4.float()
    moes = moe_layers(model)
    assert len(moes) == 5  # 4 layers + the MTP block
    track_load(moes, True)
    pretrain_losses(model, _batch(), mtp_lambda=0.3, seq_aux_alpha=1e-3, moes=moes, doc_mask=False).total.backward()
    assert all(float(m.expert_load.sum()) > 0 for m in moes)
    before = [getattr(m.gate, "e_score_correction_bias", None) for m in moes]
    before = [None if b is None else b.clone() for b in before]
    update_bias(moes, 1e-2)
    assert before[0] is None  # the hash-routed first layer has no selection bias
    assert all(not torch.equal(b, m.gate.e_score_correction_bias) for b, m in zip(before[1:], moes[1:]))
    assert all(float(m.expert_load.sum()) == 0 for m in moes)
    track_load(moes, False)


V4_TRAIN = {k: v for k, v in RELEASED.items() if k not in ("vocab_size",)}


def _config(shards, out, **kw) -> PretrainConfig:
    raw = {"model": V4_TRAIN, "data": str(shards / "shards"), "out": str(out), "seq_len": 48, "batch_size": 4,
           "max_steps": 30, "warmup_steps": 3, "lr": 3e-3, "fim_rate": 0.0, "eval_every": 30, "eval_batches": 2,
           "ckpt_every": 100, "seq_aux_alpha": 1e-4, "mtp_lambda": 0.3, "progress": False, "doc_mask": False,
           "save_dtype": "float32", **kw}
    return PretrainConfig.from_dict(raw)


def test_pretrain_trains_v4_and_the_model_generates(shards, tmp_path):
    from dsv3.engine.sampling import SamplingParams
    from dsv3.llm import LLM
    from dsv3.train.pretrain import pretrain

    with pytest.raises(PretrainConfigError, match="doc_mask: false"):
        pretrain(_config(shards, tmp_path / "masked", doc_mask=True))
    summary = pretrain(_config(shards, tmp_path / "run"))
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert rows[-1]["mtp_loss"] < rows[0]["mtp_loss"]
    assert len(rows[-1]["load_max_over_mean"]) == 5
    assert summary["heldout_loss"] < rows[0]["loss"]
    final = tmp_path / "run/final"
    assert json.loads((final / "config.json").read_text())["model_type"] == "deepseek_v4"
    vocab = TokenShards(shards / "shards").vocab_size
    model = load_model(final, dtype="fp32", progress=False)
    batch = PackedDataset(TokenShards(shards / "shards", "heldout"), 48, 2, seed=0, shuffle=False).batch(0)
    with torch.no_grad():
        logits = model(batch.input_ids)
    assert logits.shape[-1] >= vocab and torch.isfinite(logits).all()
    out = LLM(str(final), dtype="float32").generate(["def f("], SamplingParams(max_tokens=8, temperature=0))
    assert len(out[0].outputs[0].token_ids) >= 1


def test_training_speed_bench_runs_both_sides(tmp_path):
    """bench/v4_train_speed.py on a short row: both trainers step, and it writes what it prints."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from v4_train_speed import main

    assert main(["--seq-len", "48", "--steps", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["dsv3_tok_s"] > 0 and r["hf_tok_s"] > 0 and r["ratio"] == pytest.approx(r["dsv3_tok_s"] / r["hf_tok_s"])
    assert r["bound_tok_s"] == pytest.approx(r["gemm_flop_s"] / r["train_flops_per_token"])


def test_training_init_is_transformers_and_every_tensor_random_for_tests():
    """`init_weights` (what `dsv3 pretrain` starts from) sets sinks, mHC bases, compressor position biases and router
    biases to 0 and mHC scales to 1, as transformers' `_init_weights`; `every_tensor=True` draws them at random."""
    cfg = ModelConfig.from_dict(RELEASED)
    model = DeepseekV4ForCausalLM(cfg)
    model.reset_buffers()

    def special(m):
        out = {}
        for name, p in m.named_parameters():
            last = name.rsplit(".", 1)[-1]
            if last == "attn_sink" or last == "ape" or (last.startswith("hc_") and last.endswith(("_base", "_scale"))):
                out[name] = p.detach().clone()
        out.update({n: b.clone() for n, b in m.named_buffers() if n.endswith("e_score_correction_bias")})
        return out

    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    got = special(model)
    assert any(n.endswith("attn_sink") for n in got) and any(n.endswith("ape") for n in got)
    assert any(n.endswith("e_score_correction_bias") for n in got) and any(n.endswith("_scale") for n in got)
    for name, t in got.items():
        assert bool((t == (1.0 if name.endswith("_scale") else 0.0)).all()), name
    wkv = model.model.layers[0].attn.wkv.weight
    assert abs(float(wkv.std()) - 0.02) < 0.004
    for gate in (m for m in model.modules() if hasattr(m, "tid2eid")):  # distinct experts per token
        assert bool((gate.tid2eid.sort(-1).values.diff(dim=-1) > 0).all())
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0), every_tensor=True)
    for name, t in special(model).items():
        assert t.numel() == 1 or float(t.float().std()) > 0.01, name  # ape: N(0, std); the 1-D ones N(0, 0.5)


def test_kv_norm_init_sets_the_key_value_norm_gains_only(shards, tmp_path):
    """`kv_gain` (pretrain's `kv_norm_init`) starts the attention's K=V norms -- window keys and compressed entries --
    at that gain, and leaves every other norm at 1 (the indexer's keys included); a config asking it of a model whose
    queries carry a gain is refused in one line."""
    from dsv3.train.pretrain import pretrain

    cfg = ModelConfig.from_dict(RELEASED)
    model = DeepseekV4ForCausalLM(cfg)
    model.init_weights(std=0.02, kv_gain=8.0)
    norms = {n: p for n, p in model.named_parameters() if n.endswith("norm.weight")}
    gained = {n for n in norms if n.endswith(("attn.kv_norm.weight", "attn.compressor.norm.weight"))}
    assert any("compressor" in n for n in gained) and any("kv_norm" in n for n in gained)
    assert any("indexer.compressor.norm" in n for n in norms)
    for name, p in norms.items():
        assert bool((p == (8.0 if name in gained else 1.0)).all()), name
    from test_pretrain import MODEL as V3_MODEL

    raw = _config(shards, tmp_path / "v3").to_dict()
    raw.update(model=V3_MODEL, kv_norm_init=4.0, doc_mask=True)
    with pytest.raises(PretrainConfigError, match="kv_norm_init applies"):
        pretrain(PretrainConfig.from_dict(raw))
