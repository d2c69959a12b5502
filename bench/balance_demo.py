"""Auxiliary-loss-free balancing, shown: the same short pretraining run with bias update rate γ = 0
and γ > 0, printing the expert-load imbalance (max/mean tokens per expert, per MoE layer) of each.

    python bench/balance_demo.py [--data build/shards] [--gammas 0,0.001,0.01] [--steps 300]

The model is the default model's shape (configs/pretrain-tiny.yaml) cut to 2 decoder layers (one
dense, one MoE) + its MTP module; every run has the same seed, data order and schedule, so γ is the
only difference. Two imbalance figures per layer: the mean over the last 50 steps of each step's
max/mean (one batch: noisy, and the bias itself oscillates by ±γ around balance), and max/mean of
the tokens each expert received over those 50 steps together (the load the experts' hardware would
see). Writes results.json and balance.png to --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dsv3.train.config import PretrainConfig  # noqa: E402
from dsv3.train.pretrain import pretrain  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run(data: Path, gamma: float, steps: int, out: Path, threads: int) -> list[dict]:
    base = yaml.safe_load((ROOT / "configs" / "pretrain-tiny.yaml").read_text())
    model = {**base["model"], "num_hidden_layers": 2}
    cfg = {"model": model, "data": str(data), "out": str(out), "seq_len": 256, "batch_size": 8, "max_steps": steps,
           "warmup_steps": 20, "lr": 3e-3, "bias_update_rate": gamma, "seq_aux_alpha": 0.0, "fim_rate": 0.0,
           "eval_every": 10 * steps, "eval_batches": 1, "ckpt_every": 10 * steps, "progress": True, "resume": False,
           "threads": threads}
    pretrain(PretrainConfig.from_dict(cfg))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "build" / "shards")
    ap.add_argument("--gammas", default="0,0.001,0.01")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "balance")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results, curves = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for g in (float(x) for x in args.gammas.split(",")):
            rows = run(args.data, g, args.steps, Path(tmp) / f"g{g}", args.threads)
            last = rows[-50:]
            layers = len(last[0]["load_max_over_mean"])
            window = [[sum(c) for c in zip(*(r["expert_load"][i] for r in last))] for i in range(layers)]
            results[g] = {"max_over_mean_last50": [sum(r["load_max_over_mean"][i] for r in last) / len(last) for i in range(layers)],
                          "window_max_over_mean_last50": [max(w) / (sum(w) / len(w)) for w in window],
                          "final_loss": rows[-1]["loss"]}
            curves[g] = [max(r["load_max_over_mean"]) for r in rows]
    print("\nexpert load max/mean per MoE layer over the last 50 steps (1.0 = perfectly balanced):")
    print("per step = mean of each step's max/mean; summed = max/mean of the 50 steps' token counts together")
    print(f"{'gamma':>8} | {'MoE layer 1 per step':>20} | {'summed':>6} | {'MTP MoE per step':>16} | {'summed':>6} | final loss")
    for g, r in results.items():
        per, win = r["max_over_mean_last50"], r["window_max_over_mean_last50"]
        print(f"{g:>8g} | {per[0]:>20.3f} | {win[0]:>6.3f} | {per[-1]:>16.3f} | {win[-1]:>6.3f} | {r['final_loss']:.3f}")
    (args.out / "results.json").write_text(json.dumps({str(g): r for g, r in results.items()}, indent=1))
    fig, ax = plt.subplots(figsize=(7, 4))
    for g, c in curves.items():
        ax.plot(range(1, len(c) + 1), c, label=f"γ = {g:g}", lw=1)
    ax.axhline(1.5, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("max/mean expert load (worst MoE layer)")
    ax.set_title("Auxiliary-loss-free balancing")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "balance.png", dpi=110)
    print(f"wrote {args.out / 'results.json'} and {args.out / 'balance.png'}")


if __name__ == "__main__":
    main()
