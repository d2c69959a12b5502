"""`dsv3 finetune` / `dsv3 merge` end to end on a tiny model: learning, exact resume, outputs, CLI errors."""

from __future__ import annotations

import json

import pytest
import torch

import dsv3.cli
from dsv3.io.load import load_model
from reference_decoder import Generator
from dsv3.lora import load_adapter
from dsv3.engine.sampling import SamplingParams
from dsv3.io.tokenizer import Tokenizer
from dsv3.lora.train_config import FinetuneConfigError, load_config
from dsv3.lora.trainer import finetune
from tiny_model import make_tiny_model_dir

WORDS = ["apple", "house", "table", "river", "stone", "cloud", "green", "light", "sugar", "plant", "water", "music",
         "chair", "bread", "glass", "tiger"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    recs = [{"instruction": f"Spell {w} backwards", "output": " ".join(w[::-1])} for w in WORDS]
    recs.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _cfg(model_dir, data, out, **kw):
    base = dict(model=str(model_dir), data_files=[str(data)], output_dir=str(out), learning_rate=1e-2, batch_size=4,
                micro_batch_size=4, lora_rank=8, train_steps=12, max_seq_len=128, plot=False)
    return load_config(None, {**base, **kw})


def test_loss_and_heldout_loss_decrease_and_outputs_are_written(model_dir, data, tmp_path):
    cfg = _cfg(model_dir, data, tmp_path / "out", eval_split=0.2, eval_every=6, routed_experts=True, plot=True,
               warmup_ratio=0.25)
    summary = finetune(cfg, progress=False, log=lambda *a: None)
    hist = summary["history"]
    train = [h["loss"] for h in hist if "loss" in h]
    evals = [h["eval_loss"] for h in hist if "eval_loss" in h]
    assert summary["used"] == len(WORDS) + 1 and summary["eval_examples"] == 3
    assert sum(train[-3:]) / 3 < 0.6 * sum(train[:3]) / 3
    assert len(evals) == 3 and evals[-1] < evals[0] - 0.5  # step 0, 6, 12: held-out loss drops
    out = tmp_path / "out"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(13))
    assert all({"loss", "lr", "tokens_per_s", "grad_norm"} <= set(x) for x in lines[1:])
    assert lines[1]["lr"] < lines[2]["lr"] < lines[3]["lr"] == pytest.approx(1e-2)  # 3 warm-up steps
    assert lines[3]["lr"] > lines[7]["lr"] > lines[12]["lr"]  # then cosine decay
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfgjson = json.loads((out / "adapter_config.json").read_text())
    assert cfgjson["peft_type"] == "LORA" and cfgjson["r"] == 8 and "experts" in cfgjson["target_modules"]
    fresh = load_model(model_dir, dtype=torch.float32, progress=False)
    ids = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = fresh(ids)
        load_adapter(fresh, out)
        assert (fresh(ids) - before).abs().max() > 1e-2  # the trained adapter reloads and acts


def test_resume_continues_with_identical_losses(model_dir, data, tmp_path):
    kw = dict(lora_dropout=0.1, train_steps=4, checkpoint_every=2, batch_size=4, micro_batch_size=2, routed_experts=True)
    full = finetune(_cfg(model_dir, data, tmp_path / "a", **kw), progress=False, log=lambda *a: None)
    ckpt = tmp_path / "a" / "checkpoints" / "step-2"
    assert (ckpt / "adapter_model.safetensors").is_file()
    resumed = finetune(_cfg(model_dir, data, tmp_path / "b", resume=str(ckpt), **kw), progress=False, log=lambda *a: None)
    a = [h["loss"] for h in full["history"]][2:]
    b = [h["loss"] for h in resumed["history"]]
    assert len(b) == 2 and a == b  # bit-identical in fp32 on CPU (dropout RNG, data order, optimizer restored)
    assert full["history"][0]["loss"] != a[0]
    with pytest.raises(FinetuneConfigError, match="other adapter settings"):
        finetune(_cfg(model_dir, data, tmp_path / "c", resume=str(ckpt), **{**kw, "lora_rank": 4}), progress=False, log=lambda *a: None)


def _cli(argv, monkeypatch, capsys):
    ours = tuple(m for m in ("dsv3.commands.finetune", "dsv3.commands.merge") if m not in dsv3.cli.COMMAND_MODULES)
    monkeypatch.setattr(dsv3.cli, "COMMAND_MODULES", dsv3.cli.COMMAND_MODULES + ours)  # until the lead wires them
    try:
        rc = dsv3.cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr()


def test_cli_errors_exit_2_with_one_line(model_dir, data, tmp_path, monkeypatch, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("learning_rat: 1e-4\n")
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n')
    cases = [
        (["finetune", "--config", tmp_path / "missing.yaml"], "missing.yaml"),
        (["finetune", "--config", bad_yaml], "unknown setting 'learning_rat'"),
        (["finetune", "--model", model_dir, "--data-files", bad_data, "--on-bad-example", "error", "-q"],
         "bad.jsonl:2: missing field 'output'"),
        (["finetune", "--model", model_dir, "--data-files", data, "--batch-size", "6", "--micro-batch-size", "4"],
         "not a multiple"),
        (["finetune", "--lora-rank", "abc"], "invalid int value"),
        (["finetune", "--target-modules", "q_a_proj", "gate"], "'gate' cannot be adapted"),
        (["finetune", "--model", model_dir, "--data-files", data, "--target-modules", "qa_proj", "-q"],
         "'qa_proj' matches no linear layer"),
        (["finetune", "--model", model_dir, "--data-files", data, "--target-modules", "experts.up_proj", "-q"],
         "routed_experts: true"),
        (["merge", "--model", model_dir, "--adapter", tmp_path / "nope", "-o", tmp_path / "m"], "does not exist"),
    ]
    for argv, needle in cases:
        rc, cap = _cli(argv, monkeypatch, capsys)
        lines = cap.err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and needle in lines[0], (argv, rc, cap.err)


def test_cli_finetune_then_merge(model_dir, data, tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(f"model: {model_dir}\ndata_files: [{data}]\noutput_dir: {tmp_path / 'out'}\nlora_rank: 4\n"
                   "batch_size: 4\nmicro_batch_size: 4\nlearning_rate: 0.01\nplot: false\n")
    rc, cap = _cli(["finetune", "--config", cfg, "--train-steps", "2", "-q"], monkeypatch, capsys)
    assert rc == 0, cap.err
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 2
    rc, cap = _cli(["merge", "--model", model_dir, "--adapter", tmp_path / "out", "-o", tmp_path / "merged", "-q"], monkeypatch, capsys)
    assert rc == 0, cap.err
    merged = load_model(tmp_path / "merged", dtype=torch.float32, progress=False)
    adapted = load_model(model_dir, dtype=torch.float32, progress=False)
    load_adapter(adapted, tmp_path / "out")
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (merged(ids) - adapted(ids)).abs().max() <= 1e-4
    # Greedy generation (absorbed MLA decode, adapter unmerged) = the merged checkpoint's generation.
    tok = Tokenizer.from_dir(model_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Spell glass backwards"}], tokenize=True)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    got = Generator(adapted, tok).complete(prompt, params).token_ids
    assert got == Generator(merged, tok).complete(prompt, params).token_ids and len(got) == 12
