"""`dsv3 pretrain`: objective, MTP, aux-loss-free balancing, schedules, exact resume, CLI errors.

Everything runs on a tiny DeepSeek-V3 model and shards built in-test from a few stdlib files.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.data import PackedDataset, TokenShards, build
from dsv3.data.packing import IGNORE_INDEX
from dsv3.model import DeepseekV3ForCausalLM
from dsv3.model.moe import Gate, MoE
from dsv3.train.balance import load_stats, moe_layers, sequence_balance_loss, track_load, update_bias
from dsv3.train.config import PretrainConfig
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
            p = sum(float(scores[t, i] / scores[t].sum()) for t in rows) / T
            expect += f * p / B
    assert float(got) == pytest.approx(expect, rel=1e-5)
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


def run_config(shards, out, **overrides) -> PretrainConfig:
    raw = {"model": MODEL, "data": str(shards / "shards"), "out": str(out), "seq_len": 32, "batch_size": 2,
           "grad_accum": 2, "max_steps": 4, "warmup_steps": 1, "lr": 3e-3, "fim_rate": 0.5, "eval_every": 2,
           "eval_batches": 2, "ckpt_every": 100, "seq_aux_alpha": 1e-3, "bias_update_rate": 1e-2,
           "mtp_lambda": [[0, 0.3], [3, 0.1]], "progress": False, **overrides}
    return PretrainConfig.from_dict(raw)


def test_resume_after_two_steps_equals_four_straight_steps(shards, tmp_path):
    from dsv3.train.pretrain import pretrain

    straight = pretrain(run_config(shards, tmp_path / "a"))
    first = pretrain(run_config(shards, tmp_path / "b", stop_after=2))
    assert first["final"] is None and first["step"] == 2
    second = pretrain(run_config(shards, tmp_path / "b"))
    assert second["start_step"] == 2 and second["step"] == 4
    rows = [[json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    assert [r["step"] for r in rows[1]] == [1, 2, 3, 4]
    assert [("heldout_loss" in r) for r in rows[1]] == [False, True, False, True]  # eval_every 2
    assert all(len(r["load_max_over_mean"]) == 2 and min(r["load_max_over_mean"]) >= 1.0 for r in rows[1])  # MoE + MTP
    for key in ("loss", "mtp_loss", "total_loss", "grad_norm", "lr", "load_max_over_mean", "seq_aux"):
        assert [r[key] for r in rows[0]] == [r[key] for r in rows[1]], key
    assert rows[0][-1]["heldout_loss"] == rows[1][-1]["heldout_loss"]
    sa = torch.load(tmp_path / "a/checkpoints/step-00000004/state.pt", weights_only=True)
    sb = torch.load(tmp_path / "b/checkpoints/step-00000004/state.pt", weights_only=True)
    for name, t in sa["model"].items():  # weights and router biases, bit for bit
        assert torch.equal(t, sb["model"][name]), name
    assert any("e_score_correction_bias" in n and t.abs().sum() > 0 for n, t in sa["model"].items())
    for pid, st in sa["optimizer"]["state"].items():
        assert all(torch.equal(v, sb["optimizer"]["state"][pid][k]) for k, v in st.items())
    assert sa["scheduler"] == sb["scheduler"] and sa["data"] == sb["data"]
    assert sorted(p.name for p in (tmp_path / "b").glob("*.png")) == ["expert_load.png", "heldout_loss.png", "loss.png"]


def _cli(argv, capsys):
    import dsv3.cli as cli

    modules = cli.COMMAND_MODULES
    if "dsv3.commands.pretrain" not in modules:
        cli.COMMAND_MODULES = modules + ("dsv3.commands.pretrain",)
    try:
        rc = cli.main(argv)
    finally:
        cli.COMMAND_MODULES = modules
    return rc, capsys.readouterr().err


def test_cli_trains_and_the_final_model_generates(shards, tmp_path, capsys):
    import yaml

    from dsv3.llm import LLM
    from dsv3.sampling import SamplingParams

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": MODEL, "data": str(shards / "shards"), "seq_len": 32, "batch_size": 2,
                                      "max_steps": 2, "eval_every": 1, "eval_batches": 1, "progress": False}))
    rc, err = _cli(["pretrain", "--config", str(config), "--out", str(tmp_path / "run"), "--lr", "1e-3",
                    "--model.num_hidden_layers", "3", "--save_dtype", "bfloat16"], capsys)
    assert rc == 0, err
    saved = yaml.safe_load((tmp_path / "run/final/pretrain.yaml").read_text())
    assert saved["lr"] == 1e-3 and saved["model"]["num_hidden_layers"] == 3
    assert json.loads((tmp_path / "run/final/config.json").read_text())["torch_dtype"] == "bfloat16"
    out = LLM(tmp_path / "run/final", progress=False).generate(["def f("], SamplingParams(max_tokens=4))
    assert len(out) == 1


@pytest.mark.parametrize("argv, culprit", [
    (["--config", "/nonexistent/p.yaml"], "/nonexistent/p.yaml"),
    (["--data", "x", "--model.hidden_size", "64", "--lr", "fast"], "lr"),
    (["--data", "x", "--model.hidden_size", "64", "--batch_size", "0"], "batch_size"),
    (["--data", "/nonexistent-shards", "--model.hidden_size", "64"], "/nonexistent-shards"),
])
def test_cli_bad_config_is_one_line_exit_2(argv, culprit, capsys):
    rc, err = _cli(["pretrain", *argv], capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("dsv3: error:") and culprit in err


def test_unknown_key_in_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: x\nmodel: {hidden_size: 64}\nlearning_rate: 0.1\n")
    rc, err = _cli(["pretrain", "--config", str(bad)], capsys)
    assert rc == 2 and "learning_rate" in err and err.count("\n") == 1


def test_torchrun_two_ranks_match_one_process_with_the_same_global_batch(shards, tmp_path):
    """DDP on CPU (gloo): 2 ranks × batch 1 see the windows 1 process × batch 2 sees, so losses,
    router loads and the final weights agree up to summation order."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "run.py"
    script.write_text("import json, sys\nfrom dsv3.train.config import PretrainConfig\n"
                      "from dsv3.train.pretrain import pretrain\n"
                      "pretrain(PretrainConfig.from_dict(json.loads(sys.argv[1])))\n")
    common = {"model": MODEL, "data": str(shards / "shards"), "seq_len": 32, "max_steps": 3, "warmup_steps": 1,
              "fim_rate": 0.0, "eval_every": 100, "eval_batches": 1, "bias_update_rate": 1e-2, "progress": False,
              "threads": 1}
    env = {"PYTHONPATH": str(Path(__file__).parents[1] / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    two = {**common, "batch_size": 1, "out": str(tmp_path / "ddp")}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), json.dumps(two)], check=True, env=env, capture_output=True, timeout=300)
    from dsv3.train.pretrain import pretrain
    pretrain(PretrainConfig.from_dict({**common, "batch_size": 2, "out": str(tmp_path / "one")}))
    rows = [[json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("ddp", "one")]
    assert [r["tokens"] for r in rows[0]] == [r["tokens"] for r in rows[1]]
    for a, b in zip(*rows):
        assert a["load_max_over_mean"] == pytest.approx(b["load_max_over_mean"], rel=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    sa = torch.load(tmp_path / "ddp/checkpoints/step-00000003/state.pt", weights_only=True)["model"]
    sb = torch.load(tmp_path / "one/checkpoints/step-00000003/state.pt", weights_only=True)["model"]
    assert all(torch.allclose(sa[n], sb[n], atol=1e-4) for n in sa)
