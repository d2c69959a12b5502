"""Bits per byte by context length: does the model get better when it sees more of a long document?

Held-out long documents are scored with sliding windows of growing size (512 … 32K tokens, stride
half a window, so every scored token after the first window sees at least half a window of
context). A model that uses long context predicts better as the window grows and the curve falls;
one that does not stays flat (or rises past its trained length). Documents shorter than the largest
window are still scored at every size, with less context -- give documents longer than the largest
window (whole modules or packages concatenated) for a clean curve. Draws the curve as a PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from dsv3.eval import perplexity
from dsv3.eval.backends import Backend
from dsv3.eval.data import DataError
from dsv3.eval.report import Metric, TaskResult


def evaluate(backend: Backend, paths: Sequence[str | Path], contexts: Sequence[int], limit: int | None = None,
             plot: str | Path | None = None) -> TaskResult:
    if not contexts or min(contexts) < 2:
        raise DataError("long-ppl needs --contexts of at least 2 tokens each.")
    contexts = sorted(set(contexts))
    per: dict[int, TaskResult] = {}
    for c in contexts:
        per[c] = perplexity.evaluate(backend, paths, window=c, stride=max(1, c // 2), limit=limit)
    groups = {f"context/{c}": {"bits_per_byte": r.metrics["bits_per_byte"]} for c, r in per.items()}
    first, last = per[contexts[0]].metrics["bits_per_byte"].value, per[contexts[-1]].metrics["bits_per_byte"].value
    metrics = {"bits_per_byte": per[contexts[-1]].metrics["bits_per_byte"],
               f"ratio_{contexts[-1]}_to_{contexts[0]}": Metric(last / first, float("nan"), len(contexts))}
    for c in contexts:
        metrics[f"bits_per_byte@{c}"] = per[c].metrics["bits_per_byte"]
    config = {"files": [str(p) for p in paths], "contexts": contexts, "stride": "context / 2"}
    result = TaskResult("long-ppl", backend.name, type(backend).__name__, metrics, "bits_per_byte", config,
                        groups=groups)
    if plot is not None:
        curve(result, plot)
    return result


def curve(result: TaskResult, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = result.config["contexts"]
    ys = [result.groups[f"context/{c}"]["bits_per_byte"].value for c in cs]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(cs, ys, marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xticks(cs, [f"{c // 1024}K" if c >= 1024 else str(c) for c in cs])
    ax.set_xlabel("context (tokens, sliding window)")
    ax.set_ylabel("bits per byte")
    ax.set_title(f"long-context perplexity: {result.model}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
