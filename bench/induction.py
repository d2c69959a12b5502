"""Does an architecture learn to copy? Tiny V3 and V4 models, trained from scratch, on the classic induction task.

    python bench/induction.py [--models v3,v4,v4-random] [--steps 1000] [--out bench/results/induction]

Each sequence is BOS, 32 random tokens (of 256), then the same 32 again. The first half cannot be predicted
(ln 256 = 5.55 nats a token); the second half can, once a two-layer copying circuit (a previous-token head and an
induction head) forms, and its loss then falls to ~0 in a few tens of steps: the phase change of Olsson et al.
Both models take the embedded models' widths (default: V3, default-long: V4), two layers, no MTP, and sliding
attention only for V4 (the window, 128, covers the sequence), so the difference is the attention block and the
residual (V4: one shared key-value head, attention sinks, grouped output projection, mHC). `v4` starts from
`init_weights` (what `dsv3 pretrain` uses: transformers' training init, sinks, mHC bases and position biases at
0, mHC scales at 1), `v4-random` from `init_weights(every_tensor=True)` (those tensors random, the init the
first long model was trained from). `v4:G` starts V4's K=V norms at gain G (`init_weights(kv_gain=G)`, pretrain's
`kv_norm_init`): V4 normalises its queries without a gain, so the attention logits are capped at sqrt(head_dim)·G
(8·G for these 64-wide heads). `v4:G/rR` also rotates the last R of each head's 64 values (the embedded model
rotates 16, `qk_rope_head_dim`; R = 64 is full rotary). Prints the halves' losses every 50 steps; writes
results.json and induction.png (second-half loss by step, one curve a model).

    python bench/induction.py --models v3,v4,v4:3,v4:8 --steps 800
    python bench/induction.py --models v4:8,v4:8/r32,v4:8/r64 --steps 500 --out bench/results/induction_rope
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from dsv3.config import ModelConfig
from dsv3.io.paths import model_path
from dsv3.models.registry import family

N, VOCAB, BATCH = 32, 256, 16


def tiny(which: str, v4_init: str, kv_gain: float = 1.0, rope: int = 0) -> torch.nn.Module:
    base = json.loads((model_path("long" if which == "v4" else "default") / "config.json").read_text())
    base.update(num_hidden_layers=2, num_nextn_predict_layers=0, rope_scaling=None, max_position_embeddings=4096)
    if which == "v4":
        base.update(layer_types=["sliding_attention"] * 2, compress_ratios=[0, 0, 0], mlp_layer_types=["moe", "moe"],
                    num_hash_layers=0)
        if rope:
            base.update(qk_rope_head_dim=rope, partial_rotary_factor=rope / base["head_dim"],
                        index_head_dim=max(base["index_head_dim"], rope))
    else:
        base.update(first_k_dense_replace=2)
    cfg = ModelConfig.from_dict(base)
    torch.manual_seed(0)
    model = family(cfg.model_type).model_class()(cfg, with_mtp=False)
    if hasattr(model, "reset_buffers"):
        model.reset_buffers()
    if which == "v4":
        model.init_weights(std=0.02, every_tensor=v4_init == "random", kv_gain=kv_gain)
    else:
        model.init_weights(std=0.02)
    return model.train()


def train(which: str, steps: int, lr: float, v4_init: str, kv_gain: float = 1.0, every: int = 50,
          label: str | None = None, rope: int = 0) -> list[dict]:
    model = tiny(which, v4_init, kv_gain, rope)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    rows, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        x = torch.randint(3, 3 + VOCAB, (BATCH, N), generator=g)
        ids = torch.cat([torch.zeros(BATCH, 1, dtype=torch.long), x, x], 1)
        nll = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                                reduction="none").view(BATCH, -1)
        opt.zero_grad()
        nll.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % every == 0 or step == steps:
            row = {"model": label or which, "step": step, "first_half": float(nll[:, :N].detach().mean()),
                   "second_half": float(nll[:, N + 1:].detach().mean()), "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(f"{row['model']:5s} step {step:5d}  first half {row['first_half']:.2f}  second half {row['second_half']:.2f} "
                  f"nats/token", flush=True)
    return rows


def parse_model(name: str) -> tuple[str, str, float, int] | None:
    """(architecture, init, K=V gain, rotated values per head or 0 for the model's own) of a --models entry, or None
    for an unknown one."""
    fixed = {"v3": ("v3", "training", 1.0, 0), "v4": ("v4", "training", 1.0, 0), "v4-random": ("v4", "random", 1.0, 0)}
    if name in fixed:
        return fixed[name]
    head, _, rot = name.partition("/r")
    try:
        gain = float(head.removeprefix("v4:")) if head.startswith("v4:") else 0.0
        rope = int(rot) if rot else 0
    except ValueError:
        return None
    ok = gain > 0 and (not rot or (rope > 0 and rope % 2 == 0 and rope <= 64))
    return ("v4", "training", gain, rope) if ok else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="v3,v4,v4-random,v4:8",
                    help="v3, v4, v4-random (every tensor random at init), v4:G (K=V norm gain G at init) or v4:G/rR "
                         "(and R rotated values per head)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/induction")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.models.split(",")
    bad = [m for m in names if parse_model(m) is None]
    if bad:
        ap.error(f"unknown model {bad[0]!r}: use v3, v4, v4-random, v4:G with a positive gain G or v4:G/rR with an "
                 "even R of 2 to 64")
    rows = []
    for m in names:
        which, init, gain, rope = parse_model(m)
        rows += train(which, args.steps, args.lr, init, gain, label=m, rope=rope)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for m in names:
        pts = [r for r in rows if r["model"] == m]
        ax.plot([r["step"] for r in pts], [r["second_half"] for r in pts], label=m)
    ax.axhline(math.log(VOCAB), color="grey", lw=0.8, ls="--", label=f"ln {VOCAB} (no copying)")
    ax.set_xlabel("training step")
    ax.set_ylabel("second-half loss (nats/token)")
    ax.set_title("Induction: copying a repeated random sequence")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "induction.png", dpi=120)
    print(f"wrote {out / 'results.json'} and {out / 'induction.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
