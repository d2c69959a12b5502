"""LoRA on the embedded default model: a new instruction task lowers held-out loss and sets the answer style (slow).

The default model was pretrained on code only, never on chat-formatted instructions. The task: "Write a
Python function NAME that returns the OP of a and b." -> `def NAME(a, b):\n    return a SYM b`. Held-out
records use function names never trained on; a 9M-parameter model learns the format, not yet to copy
an unseen name exactly. Prints the margin and a held-out answer (quoted in docs).
"""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from dsv3.io.load import load_model
from reference_decoder import Generator
from dsv3.lora import load_adapter
from dsv3.lora.train_config import load_config
from dsv3.lora.trainer import finetune
from dsv3.io.paths import default_model_dir
from dsv3.engine.sampling import SamplingParams
from dsv3.io.tokenizer import Tokenizer

pytestmark = pytest.mark.slow
OPS = {"sum": "a + b", "difference": "a - b", "product": "a * b", "quotient": "a / b", "remainder": "a % b",
       "power": "a ** b", "larger": "max(a, b)", "smaller": "min(a, b)"}
WORDS = ["apple", "river", "stone", "cloud", "green", "light", "sugar", "plant", "water", "music", "chair", "bread",
         "glass", "tiger", "maple", "ocean", "pearl", "ember", "frost", "lemon", "cedar", "coral", "delta", "eagle"]


def _records(names: list[str], rng: random.Random) -> list[dict]:
    out = []
    for name in names:
        for op in rng.sample(sorted(OPS), 4):
            out.append({"instruction": f"Write a Python function {name} that returns the {op} of a and b.",
                        "output": f"def {name}(a, b):\n    return {OPS[op]}\n"})
    return out


def test_default_model_learns_an_instruction_task(tmp_path):
    try:
        model_dir = default_model_dir()
    except Exception:
        pytest.skip("no embedded default model")
    rng = random.Random(0)
    names = [f"{a}_{b}" for a in WORDS for b in WORDS if a != b]
    rng.shuffle(names)
    train, held = _records(names[:60], rng), _records(names[60:75], rng)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    cfg = load_config(None, dict(model=str(model_dir), data_files=[str(tmp_path / "train.jsonl")],
                                 eval_files=[str(tmp_path / "held.jsonl")], output_dir=str(tmp_path / "out"),
                                 learning_rate=2e-3, batch_size=8, micro_batch_size=8, lora_rank=16, train_steps=90,
                                 eval_every=30, max_seq_len=256, packing=False))
    summary = finetune(cfg, progress=False, log=lambda *a: None)
    evals = [h["eval_loss"] for h in summary["history"] if "eval_loss" in h]
    model = load_model(model_dir, dtype=torch.float32, progress=False)
    tok = Tokenizer.from_dir(model_dir)
    ask = held[0]["instruction"]
    prompt = tok.apply_chat_template([{"role": "user", "content": ask}], tokenize=True)
    params = SamplingParams(max_tokens=40, temperature=0)
    before = Generator(model, tok).complete(prompt, params).text
    load_adapter(model, tmp_path / "out")
    after = Generator(model, tok).complete(prompt, params).text
    report = {"held_out_loss_before": evals[0], "held_out_loss_after": evals[-1], "instruction": ask,
              "before": before, "after": after, "expected": held[0]["output"]}
    print(json.dumps(report, indent=2))
    assert evals[-1] < evals[0] - 1.0
    assert re.match(r"def \w+\(a, b\):\n    return ", after)  # the trained answer format
    assert not re.match(r"def \w+\(a, b\):\n    return ", before)  # which the base model did not produce
