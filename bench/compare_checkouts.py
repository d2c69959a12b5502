"""Run one benchmark from two checkouts of dsv3 in the same run and print their figures side by side.

    python bench/compare_checkouts.py --base ../dsv3-before [--rounds 2] -- bench/engine_bench.py --anchors ''

A refactor claims "no speed change"; this is how it shows it. Each checkout runs its own copy of the
script (module paths may differ between them) with its own `src/` first on PYTHONPATH, the two
alternate round by round (A B, B A, ...) so drift in the machine's state falls on both, and every
numeric figure of the JSON the script writes under `--out` is matched by its labels. Printed: the
median of the rounds per checkout, after / before, and a mark where they differ by more than
--tolerance. Writes compare.json and a PNG of the ratios next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOWER_IS_BETTER = {"ms", "rss", "bytes", "b", "ppl", "kl", "mib", "seconds", "s"}  # words of a figure's last label (its unit)


STATISTICS = {"p50", "p90", "p95", "p99", "mean", "median", "min", "max"}  # a last label that names no unit


def lower_is_better(key: str) -> bool:
    """Whether a smaller value is better: decided by the words of the last label only ("... | ms", "peak_rss"), so a
    row named "TTFT speed-up ... | x" is not taken for seconds; a rate ("tok/s") is higher-is-better. A statistic
    ("latency_s | p50") is read by the label before it."""
    parts = key.lower().split(" | ")
    last = parts[-2] if parts[-1] in STATISTICS and len(parts) > 1 else parts[-1]
    if last.endswith("/s") or last.endswith("tok_s") or last.endswith("_per_s"):  # rates: tok/s, prefill_tok_s
        return False
    return any(w in LOWER_IS_BETTER for w in re.split(r"[^a-z0-9]+", last))


def flatten(obj: object, labels: tuple[str, ...] = ()) -> dict[str, float]:
    """Numeric leaves of a results JSON keyed by their labels: in a list of rows, a row's string fields name it."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        names = tuple(str(v) for k, v in obj.items() if isinstance(v, str))
        for k, v in obj.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[" | ".join(labels + names + (() if k == "value" else (k,)))] = float(v)
            elif isinstance(v, (dict, list)):
                out.update(flatten(v, labels + names + (k,)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            sub = flatten(v, labels)
            if any(k in out for k in sub):  # unnamed rows: keep them apart by position
                sub = flatten(v, labels + (f"#{i}",))
            out.update(sub)
    return out


def run_once(checkout: Path, script: str, args: list[str], out: Path, python: str) -> dict[str, float]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(checkout / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t = time.perf_counter()
    proc = subprocess.run([python, script, *args, "--out", str(out)], cwd=checkout, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    (out / "log.txt").write_text(proc.stdout)
    if proc.returncode != 0:
        sys.exit(f"{script} failed in {checkout} (exit {proc.returncode}); its output is in {out / 'log.txt'}:\n"
                 + proc.stdout[-2000:])
    figures: dict[str, float] = {}
    for f in sorted(out.rglob("*.json")):
        figures.update(flatten(json.loads(f.read_text()), (f.stem,)))
    print(f"  {checkout.name}: {len(figures)} figures in {time.perf_counter() - t:.0f} s", flush=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        sys.exit("usage: compare_checkouts.py --base DIR [options] -- SCRIPT [ARGS...]")
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="the checkout to compare against (before)")
    ap.add_argument("--new", type=Path, default=Path(__file__).resolve().parents[1], help="the other checkout (after)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--out", type=Path, default=None, help="where to keep the runs (default: a temporary folder)")
    opts = ap.parse_args(argv[:cut])
    script, args = argv[cut + 1], argv[cut + 2:]
    root = opts.out or Path(tempfile.mkdtemp(prefix="compare_"))
    sides = {"before": opts.base.resolve(), "after": opts.new.resolve()}
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for r in range(opts.rounds):
        order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
        print(f"round {r + 1}/{opts.rounds}", flush=True)
        for side in order:
            runs[side].append(run_once(sides[side], script, args, root / side / f"round{r}", opts.python))
    keys = [k for k in runs["after"][0] if all(k in x for x in runs["before"] + runs["after"])]
    rows = []
    print(f"\n{script} {' '.join(args)}: before = {sides['before']}, after = {sides['after']}; "
          f"median of {opts.rounds} alternating rounds\n")
    print(f"{'figure':<92}{'before':>12}{'after':>12}{'after/before':>14}")
    for k in keys:
        b = statistics.median(x[k] for x in runs["before"])
        a = statistics.median(x[k] for x in runs["after"])
        ratio = a / b if b else (1.0 if a == b else float("inf"))
        lower = lower_is_better(k)
        worse = ratio > 1 + opts.tolerance if lower else ratio < 1 - opts.tolerance
        flag = "  <-- slower/worse" if worse else ""
        rows.append(dict(figure=k, before=b, after=a, ratio=ratio, lower_is_better=lower, worse=worse))
        print(f"{k[:91]:<92}{b:>12.4g}{a:>12.4g}{ratio:>13.3f}x{flag}")
    only = sorted(set().union(*runs["before"], *runs["after"]) - set(keys))
    if only:
        print(f"\n{len(only)} figures appear on one side only (not compared): {', '.join(only[:8])}{' ...' if len(only) > 8 else ''}")
    n_worse = sum(r["worse"] for r in rows)
    print(f"\n{len(rows)} figures compared; {n_worse} worse than before by more than {opts.tolerance:.0%}")
    (root / "compare.json").write_text(json.dumps(dict(script=script, args=args, sides={k: str(v) for k, v in sides.items()},
                                                       rounds=opts.rounds, rows=rows), indent=1))
    plot(rows, root / "compare.png", opts.tolerance)
    print(f"wrote {root / 'compare.json'} and {root / 'compare.png'}")
    return 0


def plot(rows: list[dict], path: Path, tol: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["before"]]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(rows) + 1.2))
    ax.barh([r["figure"][:70] for r in rows], [r["ratio"] for r in rows],
            color=["tab:red" if r["worse"] else "tab:blue" for r in rows])
    for x in (1 - tol, 1, 1 + tol):
        ax.axvline(x, color="gray", lw=0.8, ls="-" if x == 1 else "--")
    ax.set_xlabel("after / before")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
