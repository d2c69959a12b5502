"""Results: one JSON file per run, a terminal table, and a bar chart across runs.

The JSON keeps everything needed to trust or redo a number (model, backend, task settings,
per-group scores and per-sample outcomes); the chart puts several such files side by side,
with standard-error bars, so e.g. a quantized model can be compared with its original.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from dsv3.eval.data import DataError

FORMAT_VERSION = 1


@dataclass
class Metric:
    """One reported number with its standard error and the number of items behind it."""

    value: float
    stderr: float = math.nan
    n: int = 0


@dataclass
class TaskResult:
    """Everything one `dsv3 eval TASK` run measured."""

    task: str
    model: str
    backend: str
    metrics: dict[str, Metric]
    primary: str
    config: dict = field(default_factory=dict)
    seconds: float = 0.0
    groups: dict[str, dict[str, Metric]] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        def enc(m: Metric) -> dict:
            return {"value": _num(m.value), "stderr": _num(m.stderr), "n": m.n}

        return {"format": FORMAT_VERSION, "task": self.task, "model": self.model, "backend": self.backend,
                "primary": self.primary, "seconds": round(self.seconds, 3), "config": self.config,
                "metrics": {k: enc(m) for k, m in self.metrics.items()},
                "groups": {g: {k: enc(m) for k, m in ms.items()} for g, ms in self.groups.items()},
                "samples": self.samples}

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "TaskResult":
        p = Path(path)
        try:
            d = json.loads(p.read_text())
            dec = lambda m: Metric(_nan(m["value"]), _nan(m.get("stderr")), int(m.get("n", 0)))  # noqa: E731
            return cls(d["task"], d["model"], d["backend"], {k: dec(m) for k, m in d["metrics"].items()},
                       d["primary"], d.get("config", {}), float(d.get("seconds", 0.0)),
                       {g: {k: dec(m) for k, m in ms.items()} for g, ms in d.get("groups", {}).items()},
                       d.get("samples", []))
        except OSError as e:
            raise DataError(f"results file {p} cannot be read ({e.strerror}).") from None
        except (ValueError, KeyError, TypeError, AttributeError):
            raise DataError(f"results file {p} is not a dsv3 eval results.json.") from None


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def _nan(x) -> float:
    return math.nan if x is None else float(x)


def format_table(results: Sequence[TaskResult], labels: Sequence[str] | None = None) -> str:
    """A fixed-width table: [run,] task, model, metric, value ± stderr, samples, time."""
    head = ("run",) if labels else ()
    rows = [head + ("task", "model", "metric", "value", "± stderr", "samples", "time")]
    for i, r in enumerate(results):
        for name, m in r.metrics.items():
            se = "" if math.isnan(m.stderr) else f"{m.stderr:.4f}"
            rows.append(((labels[i],) if labels else ()) + (r.task, r.model, name + (" *" if name == r.primary else ""),
                        f"{m.value:.4f}", se, str(m.n), f"{r.seconds:.1f}s"))
    left = len(head) + 3
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n(* = primary metric)"


def bar_chart(results: Sequence[TaskResult], labels: Sequence[str], out: str | Path, title: str | None = None,
              metrics: Sequence[str] | None = None) -> Path:
    """Grouped bars: one group per (task, metric) of the runs, one bar per run, stderr whiskers.

    By default perplexities are left out: their scale (often hundreds) would flatten every score.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys: list[tuple[str, str]] = []
    for r in results:
        for name in r.metrics:
            wanted = name in metrics if metrics else not name.endswith("perplexity")
            if wanted and (r.task, name) not in keys:
                keys.append((r.task, name))
    if not keys:
        raise DataError(f"none of the results files has the metric(s) {', '.join(metrics or [])} to draw.")
    width = 0.8 / max(1, len(results))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(keys) * max(1, len(results)) ** 0.5), 4.5))
    for i, (r, label) in enumerate(zip(results, labels)):
        xs, ys, es = [], [], []
        for j, (task, name) in enumerate(keys):
            m = r.metrics.get(name) if r.task == task else None
            if m is not None and not math.isnan(m.value):
                xs.append(j + (i - (len(results) - 1) / 2) * width)
                ys.append(m.value)
                es.append(0.0 if math.isnan(m.stderr) else m.stderr)
        bars = ax.bar(xs, ys, width, yerr=es, capsize=3, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax.set_xticks(range(len(keys)), [f"{t}\n{n}" for t, n in keys], fontsize=8)
    ax.set_ylabel("score")
    ax.set_title(title or "dsv3 eval: " + " vs ".join(labels))
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
