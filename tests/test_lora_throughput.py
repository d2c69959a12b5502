"""Throughput of `dsv3 finetune` vs PEFT + transformers `Trainer` on the ~73M bench model (slow; CPU).

Same records, rows per step, micro batch, rank and target modules (the MLA projections, which PEFT on
transformers v5 adapts exactly as we do). Reports tokens/s by wall clock and per CPU-second (the latter
is steadier on a shared machine) into `lora_throughput.json` under pytest's tmp dir and stdout.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import pytest
import torch

from dsv3.lora.batching import IGNORE
from dsv3.lora.train_config import load_config
from dsv3.lora.trainer import Trainer

pytestmark = pytest.mark.slow
STEPS, BS, MBS, RANK = 4, 8, 4, 64
TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


def _bench_model(tmp: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    models = pytest.importorskip("models")
    return models.make_bench_model(tmp / "bench73m")


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def test_finetune_throughput_vs_peft_trainer(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model_dir = _bench_model(tmp_path)
    words = Path(torch.__file__).read_text().split()
    rng = random.Random(0)
    recs = [{"instruction": " ".join(rng.choices(words, k=60)), "output": " ".join(rng.choices(words, k=60))}
            for _ in range(BS * STEPS)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = load_config(None, dict(model=str(model_dir), data_files=[str(tmp_path / "data.jsonl")], output_dir=str(tmp_path / "ours"),
                                 batch_size=BS, micro_batch_size=MBS, lora_rank=RANK, target_modules=TARGETS,
                                 train_steps=STEPS, packing=False, max_seq_len=1024, plot=False))
    tr = Trainer(cfg, log=lambda *a: None)
    ours_params = sum(p.numel() for g in tr.opt.param_groups for p in g["params"])
    tr.train_step()  # warm-up
    (w0, c0), toks = _clock(), 0
    for _ in range(STEPS - 1):
        toks += tr.train_step()["tokens"]
    (w1, c1) = _clock()
    ours = {"wall": toks / (w1 - w0), "cpu": toks / (c1 - c0)}

    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS))
    theirs_params = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    ds = [{"input_ids": e.ids, "labels": [t if m else IGNORE for t, m in zip(e.ids, e.mask)]} for row in tr.rows for e in row]
    seen = {"tokens": 0}

    def collate(batch):
        T = max(len(b["input_ids"]) for b in batch)
        pad = [T - len(b["input_ids"]) for b in batch]
        seen["tokens"] += sum(T - p for p in pad)
        return {"input_ids": torch.tensor([b["input_ids"] + [0] * p for b, p in zip(batch, pad)]),
                "labels": torch.tensor([b["labels"] + [IGNORE] * p for b, p in zip(batch, pad)]),
                "attention_mask": torch.tensor([[1] * (T - p) + [0] * p for p in pad])}

    marks = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append((*_clock(), seen["tokens"]))

    args = transformers.TrainingArguments(output_dir=str(tmp_path / "peft"), per_device_train_batch_size=MBS,
                                          gradient_accumulation_steps=BS // MBS, max_steps=STEPS, learning_rate=2e-5,
                                          use_cpu=True, report_to=[], save_strategy="no", logging_steps=1000,
                                          dataloader_num_workers=0, remove_unused_columns=False)
    transformers.Trainer(model=pm, args=args, train_dataset=ds, data_collator=collate, callbacks=[Clock()]).train()
    (w0, c0, t0), (w1, c1, t1) = marks[0], marks[-1]
    theirs = {"wall": (t1 - t0) / (w1 - w0), "cpu": (t1 - t0) / (c1 - c0)}
    report = {"model": "bench73m", "steps_timed": STEPS - 1, "batch": BS, "micro_batch": MBS, "rank": RANK,
              "dsv3_tokens_per_s": ours, "peft_trainer_tokens_per_s": theirs,
              "ratio_wall": ours["wall"] / theirs["wall"], "ratio_cpu": ours["cpu"] / theirs["cpu"]}
    (tmp_path / "lora_throughput.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    assert ours_params == theirs_params  # the same adapter is being trained on both sides
    assert ours["wall"] > 0 and theirs["wall"] > 0
