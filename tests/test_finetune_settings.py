"""The fine-tuning request's settings as written: `learning_rate: 2e-5` in YAML, batches counted in examples,
a step's contents said in words, and re-runs that neither overwrite nor mix earlier runs."""

from __future__ import annotations

import json

import pytest

import dsv3.cli
from dsv3.lora.train_config import FinetuneConfigError, load_config
from dsv3.lora.trainer import Trainer, batch_note
from tiny_model import make_tiny_model_dir

N = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"count to {i}", "output": " ".join(map(str, range(i + 1)))}) + "\n"
                            for i in range(N)))
    return path


def test_yaml_scientific_notation_is_a_float(tmp_path):
    """YAML 1.1 reads `2e-5` (no dot) as a string; the request's config writes it that way."""
    cfg_file = tmp_path / "ft.yaml"
    cfg_file.write_text("learning_rate: 2e-5\nweight_decay: 1E-2\nwarmup_ratio: .05\n")
    cfg = load_config(cfg_file, {})
    assert cfg.learning_rate == 2e-5 and cfg.weight_decay == 0.01 and cfg.warmup_ratio == 0.05
    for bad in ("learning_rate: fast\n", "learning_rate: .nan\n", "learning_rate: 'nan'\n"):
        cfg_file.write_text(bad)
        with pytest.raises(FinetuneConfigError, match="learning_rate"):
            load_config(cfg_file, {})
    with pytest.raises(FinetuneConfigError, match="batch_unit"):
        load_config(None, {"batch_unit": "tokens"})


def test_examples_batch_holds_exactly_batch_size_examples_and_covers_each_once_per_epoch(model_dir, data, tmp_path):
    cfg = load_config(None, dict(model=str(model_dir), data_files=[str(data)], output_dir=str(tmp_path / "o"),
                                 batch_unit="examples", batch_size=4, micro_batch_size=1, max_seq_len=256, epochs=2.0))
    logs = []
    t = Trainer(cfg, log=logs.append)
    assert t.total == 2 * N // 4  # steps count examples, not packed rows
    seen = []
    for step in range(N // 4):  # one epoch
        rows = t.step_rows(step)
        examples = [e for row in rows for e in row]
        assert len(examples) == 4 and len(rows) < 4  # packed: fewer rows than examples
        assert all(sum(len(e.ids) for e in row) <= 256 for row in rows)
        seen += [e.where for e in examples]
    assert sorted(seen) == sorted(f"{data}:{i}" for i in range(1, N + 1))
    assert any(f"batch: 4 examples per step, packed into rows of up to 256 tokens" in m for m in logs)
    assert any("6 steps see each of the 12 examples 2.0 times" in m for m in logs)


def test_rows_batch_says_how_often_each_example_is_seen():
    from dsv3.lora.train_config import FinetuneConfig

    # the report's case: 50 short records packed into 2,048-token rows, batch_size 32, 20 steps
    note = batch_note(FinetuneConfig(batch_size=32, max_seq_len=2048), n_examples=50, n_rows=3, steps=20)
    assert note == ("batch: 32 rows of up to 2048 tokens (examples packed) per step; the 50 examples fill 3 rows, "
                    "so 20 steps see each example 213.3 times; batch_unit: examples makes batch_size count examples")
    note = batch_note(FinetuneConfig(batch_size=32, batch_unit="examples", max_seq_len=2048), 50, 3, 20)
    assert note.endswith("20 steps see each of the 50 examples 12.8 times")


def test_cli_runs_the_request_config_and_refuses_to_mix_runs(model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    cfg_file = tmp_path / "ft.yaml"
    cfg_file.write_text(f"model: {model_dir}\ndata_files: [{data}]\noutput_dir: {out}\nlearning_rate: 2e-5\n"
                        "batch_size: 4\nbatch_unit: examples\nmicro_batch_size: 2\nlora_rank: 4\ntrain_steps: 2\n"
                        "checkpoint_every: 1\nmax_seq_len: 128\nplot: false\n")
    assert dsv3.cli.main(["finetune", "--config", str(cfg_file), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "batch: 4 examples per step" in printed
    assert (out / "checkpoints" / "step-1").is_dir() and (out / "adapter_model.safetensors").is_file()

    assert dsv3.cli.main(["finetune", "--config", str(cfg_file), "-q"]) == 2  # the earlier run stays untouched
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and "--resume auto" in err

    assert dsv3.cli.main(["finetune", "--config", str(cfg_file), "-q", "--resume", "auto", "--train-steps", "3"]) == 0
    assert "resuming from" in capsys.readouterr().out and (out / "checkpoints" / "step-2").is_dir()

    assert dsv3.cli.main(["finetune", "--config", str(cfg_file), "-q", "--overwrite", "--checkpoint-every", "0"]) == 0
    capsys.readouterr()
    assert not (out / "checkpoints").exists()  # --resume auto can no longer pick up the replaced run
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
