"""A tiny DeepSeek-V3-style tokenizer trained in-test on Python's own standard library.

Tests that need a model directory (model, engine, CLI, server) call `make_tiny_tokenizer` instead
of downloading anything: a few fixed stdlib modules, a 512-token byte-level BPE, well under a
second, and the same files and vocabulary on every run.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from dsv3.data.tokenizer_train import train_tokenizer

# Small, long-lived stdlib modules; whichever of them exist are used (at least three always do).
STDLIB_FILES = ("textwrap.py", "string.py", "bisect.py", "heapq.py", "fnmatch.py", "colorsys.py", "keyword.py",
                "shlex.py", "glob.py")


def stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [root / name for name in STDLIB_FILES if (root / name).is_file()]
    if len(files) < 3:
        raise RuntimeError(f"expected the standard library's sources under {root}")
    return files


def make_tiny_tokenizer(out_dir: Path, vocab_size: int = 512) -> Path:
    """Train a `vocab_size`-token tokenizer into `out_dir` (tokenizer.json + configs) and return `out_dir`."""
    return train_tokenizer(stdlib_sources(), vocab_size, out_dir, min_frequency=2, model_max_length=4096,
                           show_progress=False)
