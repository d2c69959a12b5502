"""Documented functions of one split as standalone files: the corpus of an annealing stage.

A short function with a docstring is the smallest whole unit of code: signature, what it does, a
body, and an end. A small model trained only on long files learns to continue code but rarely to
finish a function; a last stretch of pretraining that mixes these in (`mix` in `dsv3 pretrain`)
teaches it to close the body, the way phi-1 and the annealing phases of recent LLMs use short,
self-contained data at the end of training. Each kept function (the `dsv3 data instructions`
filter, deduplicated by source) is written dedented to `<out>/<hash>.py`, ready for `dsv3 data build`.
"""

from __future__ import annotations

from pathlib import Path

from dsv3.data.instructions import kept_functions


def write_functions(files: list[tuple[str, Path]], out: str | Path, progress: bool = False, **filters) -> dict:
    """Write every kept function of `files` to `out`; return counts (files, functions, kept, duplicates, chars)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats: dict = {}
    chars = 0
    for key, site in kept_functions(files, stats, progress, desc="functions", **filters):
        (out / f"{key[:20]}.py").write_text(site.source, encoding="utf-8")
        chars += len(site.source)
    return {**stats, "chars": chars}
