"""`dsv3 pretrain` end to end: exact resume, torchrun data parallelism, the CLI and its errors.

Uses the tiny model and in-test shards of `test_pretrain.py` (its `shards` fixture).
"""

from __future__ import annotations

import json

import pytest
import torch

from dsv3.train.config import PretrainConfig
from test_pretrain import MODEL, shards  # noqa: F401  (pytest fixture)


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
    from dsv3.engine.sampling import SamplingParams

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": MODEL, "data": str(shards / "shards"), "seq_len": 32, "batch_size": 2,
                                      "max_steps": 2, "eval_every": 1, "eval_batches": 1, "progress": False}))
    rc, err = _cli(["pretrain", "--config", str(config), "--out", str(tmp_path / "run"), "--lr", "1e-3",  # both spellings
                    "--model.num-hidden-layers", "3", "--save_dtype", "bfloat16", "--max-steps", "2"], capsys)
    assert rc == 0, err
    saved = yaml.safe_load((tmp_path / "run/final/pretrain.yaml").read_text())
    assert saved["lr"] == 1e-3 and saved["model"]["num_hidden_layers"] == 3
    final = json.loads((tmp_path / "run/final/config.json").read_text())
    assert final["torch_dtype"] == "bfloat16"
    assert final["training_seq_len"] == 32  # what dsv3.models.context_length warns past
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


def test_export_every_writes_model_directories_of_the_weights_at_that_step(shards, tmp_path):
    from dsv3.io.load import load_model
    from dsv3.train.pretrain import pretrain

    s = pretrain(run_config(shards, tmp_path / "x", export_every=2, ckpt_every=2, keep_checkpoints=3))
    out = tmp_path / "x"
    assert sorted(p.name for p in out.glob("step-*")) == ["step-2"]  # the last step is final/ itself
    exported = load_model(out / "step-2", dtype=torch.float32, progress=False).state_dict()
    state = torch.load(out / "checkpoints/step-00000002/state.pt", weights_only=True)["model"]
    for name, t in state.items():  # the step-2 weights, not the final ones, and training went on unchanged
        assert torch.equal(exported[name], t), name
    final = load_model(s["final"], dtype=torch.float32, progress=False).state_dict()
    assert any(not torch.equal(final[n], t) for n, t in state.items() if t.is_floating_point())
    plain = pretrain(run_config(shards, tmp_path / "y"))
    assert plain["loss"] == s["loss"] and plain["heldout_loss"] == s["heldout_loss"]
    assert (out / "step-2" / "tokenizer.json").is_file() and (out / "step-2" / "pretrain.yaml").is_file()


def test_export_every_must_not_be_negative(tmp_path):
    from dsv3.train.config import PretrainConfigError

    with pytest.raises(PretrainConfigError, match="export_every -1"):
        PretrainConfig.from_dict({"model": MODEL, "data": "d", "out": str(tmp_path), "export_every": -1})
