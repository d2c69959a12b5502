"""End-of-run PNGs from the metrics rows: training loss, held-out loss, expert load balance."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_plots(rows: list[dict], out: str | Path) -> list[Path]:
    """Write loss.png, heldout_loss.png and expert_load.png into `out`; return their paths."""
    out = Path(out)
    if not rows:
        return []
    steps = [r["step"] for r in rows]
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in rows], label="next-token loss")
    mtp = [(r["step"], r["mtp_loss"]) for r in rows if r.get("mtp_loss") is not None]
    if mtp:
        ax.plot(*zip(*mtp), label="MTP loss", alpha=0.8)
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title="training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "loss.png"))

    held = [(r["step"], r["heldout_loss"]) for r in rows if r.get("heldout_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if held:
        ax.plot(*zip(*held), marker="o", label="held-out")
    ax.plot(steps, [r["loss"] for r in rows], alpha=0.4, label="train")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title="held-out loss")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "heldout_loss.png"))

    loads = [r.get("load_max_over_mean") or [] for r in rows]
    n_layers = max((len(x) for x in loads), default=0)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i in range(n_layers):
        pts = [(s, x[i]) for s, x in zip(steps, loads) if len(x) > i]
        ax.plot(*zip(*pts), label=f"MoE layer {i}", linewidth=1)
    ax.axhline(1.0, color="black", linestyle=":", linewidth=1)
    ax.set(xlabel="optimizer step", ylabel="max / mean tokens per expert", title="expert load")
    if n_layers:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "expert_load.png"))
    return paths
