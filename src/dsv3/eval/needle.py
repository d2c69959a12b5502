"""Needle in a haystack (passkey retrieval): can the model repeat a key placed anywhere in a long context?

The standard long-context probe (Mohtashami & Jaggi's passkey task, Kamradt's needle-in-a-haystack,
RULER's niah): a random key is written once at a chosen depth of filler text, and at the end the
model is asked for it. Each cell of a (context length × depth) grid is scored by exact match of
the greedy answer over a few seeded trials, and the grid is drawn as a heatmap -- the way these
results are usually shown.

The default format is code, for code models (the embedded models are): the needle is an assignment
`PASSKEY = "48213"` on a line of its own in a haystack of Python sources, and the question is an
`assert PASSKEY == "` the model completes. `--format text` uses the prose form for chat/text models.
Lengths are counted in the model's tokens (the served model's tokenizer, or `--tokenizer` over HTTP).
"""

from __future__ import annotations

import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from dsv3.eval.backends import Backend
from dsv3.eval.data import DataError, require_file
from dsv3.eval.report import Metric, TaskResult
from dsv3.eval.stats import mean, mean_stderr

FORMATS = {
    "code": ('PASSKEY = "{key}"  # the passkey: remember it\n', '\n# The passkey defined above:\nassert PASSKEY == "', ['"', "\n"]),
    "text": ("The pass key is {key}. Remember it. {key} is the pass key.\n",
             "\nWhat is the pass key? The pass key is ", ["\n", "."]),
}
KEY_DIGITS = 5


@dataclass
class Cell:
    length: int
    depth: float
    trial: int
    key: str
    prompt_tokens: int
    answer: str = ""
    correct: bool = False


def default_haystack() -> str:
    """Python sources of the standard library, in a fixed order: long, local, and code."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for p in sorted(stdlib.glob("*.py")):
        try:
            parts.append(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    return "\n".join(parts)


def load_haystack(paths: Sequence[str | Path] | None) -> str:
    if not paths:
        return default_haystack()
    texts = []
    for path in paths:
        p = require_file(path, "haystack")
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text (byte {e.start}).") from None
    text = "\n".join(texts)
    if not text.strip():
        raise DataError("the haystack files are empty.")
    return text


def build_prompt(tok, haystack_ids: list[int], length: int, depth: float, key: str, fmt: str) -> tuple[str, int]:
    """(prompt text, its nominal length in tokens): haystack text with the needle on a line of its own at the
    line start nearest to `depth`, then the question."""
    needle, question, _ = FORMATS[fmt]
    n_needle = len(tok.encode(needle.format(key=key), add_special_tokens=False))
    n_question = len(tok.encode(question, add_special_tokens=False))
    fill = length - n_needle - n_question - 1  # - BOS
    if fill < 1:
        raise DataError(f"context length {length} is too short for the needle and the question.")
    if fill > len(haystack_ids):
        raise DataError(f"the haystack has {len(haystack_ids)} tokens; context length {length} needs {fill}: "
                        "give longer --haystack files.")
    hay = tok.decode(haystack_ids[:fill])
    at = len(tok.decode(haystack_ids[: round(depth * fill)]))
    reach = max(8, len(hay) // 50)  # snap to a line start at most 2 % of the haystack away, else split the line
    before, after = hay.rfind("\n", 0, at), hay.find("\n", at)
    starts = [p + 1 for p in (before, after) if p >= 0 and abs(p + 1 - at) <= reach] + ([0] if at == 0 else [])
    if starts:  # the nearest line start
        at = min(starts, key=lambda p: abs(p - at))
    lead = "" if at == 0 or hay[at - 1] == "\n" else "\n"  # the needle is always a line of its own
    text = hay[:at] + lead + needle.format(key=key) + hay[at:] + question
    return text, fill + n_needle + n_question + 1


def evaluate(backend: Backend, tok, lengths: Sequence[int], depths: Sequence[float], trials: int = 3,
             haystack: Sequence[str | Path] | None = None, fmt: str = "code", seed: int = 1234,
             plot: str | Path | None = None) -> TaskResult:
    """Score every (length, depth, trial) cell; metrics: accuracy overall, per length and per depth."""
    if fmt not in FORMATS:
        raise DataError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}.")
    if not lengths or not depths or trials < 1:
        raise DataError("needle needs at least one --lengths value, one --depths value and --trials >= 1.")
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise DataError(f"--depths are fractions of the context in [0, 1], got {bad[0]}.")
    text = load_haystack(haystack)
    ids = tok.encode(text, add_special_tokens=False)
    rng = random.Random(seed)
    cells: list[Cell] = []
    prompts: list[str] = []
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                key = "".join(rng.choice("0123456789") for _ in range(KEY_DIGITS))
                prompt, n = build_prompt(tok, ids, length, depth, key, fmt)
                cells.append(Cell(length, depth, trial, key, n))
                prompts.append(prompt)
    _, _, stop = FORMATS[fmt]
    answers = backend.generate(prompts, stop=stop, max_tokens=KEY_DIGITS + 3, temperature=0.0, desc="needle")
    for cell, ans in zip(cells, answers):
        cell.answer = ans[0]
        cell.correct = re.sub(r"\D", "", cell.answer)[:KEY_DIGITS] == cell.key

    def acc(sel: list[Cell]) -> Metric:
        vals = [float(c.correct) for c in sel]
        return Metric(mean(vals), mean_stderr(vals), len(vals))

    groups = {f"length/{L}": {"acc": acc([c for c in cells if c.length == L])} for L in lengths}
    groups.update({f"depth/{d:g}": {"acc": acc([c for c in cells if c.depth == d])} for d in depths})
    groups.update({f"cell/{L}/{d:g}": {"acc": acc([c for c in cells if c.length == L and c.depth == d])}
                   for L in lengths for d in depths})
    config = {"lengths": list(lengths), "depths": list(depths), "trials": trials, "format": fmt, "seed": seed,
              "haystack": [str(p) for p in haystack] if haystack else "python stdlib sources"}
    samples = [vars(c) for c in cells]
    result = TaskResult("needle", backend.name, type(backend).__name__, {"acc": acc(cells)}, "acc", config,
                        groups=groups, samples=samples)
    if plot is not None:
        heatmap(result, plot)
    return result


def heatmap(result: TaskResult, out: str | Path) -> Path:
    """Accuracy per (context length, depth) cell as a heatmap PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths = result.config["lengths"], result.config["depths"]
    grid = [[result.groups[f"cell/{L}/{d:g}"]["acc"].value for L in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{L // 1024}K" if L >= 1024 else str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"needle retrieval: {result.model} ({result.config['trials']} trials per cell)")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
