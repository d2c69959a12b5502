"""Long documents for long-context training: each package's modules concatenated in import order, and passkey
documents.

A code model learns to use a long context only from documents whose far parts matter to what comes next. A
single file rarely is one (the default corpus averages 6,000 tokens), but a package read in import order is:
a module's names were defined in the modules it imports, which come before it. `package_documents` groups the
files of one split by directory, orders each directory's modules so that a module follows the siblings it
imports (`import x`, `from . import x`, `from .x import y`, `from pkg import x`, `from pkg.x import y`; ties and cycles by name) and
concatenates them, each under a `# file: <path>` line, into documents of at least `min_chars`.

`passkey_documents` writes the synthetic retrieval documents of long-context recipes (Mohtashami & Jaggi's
passkey task, which YaRN and LongLoRA fine-tune on): a stretch of those documents with an assignment
`NAME = "48213"` on a line of its own at a random depth, ending with `assert NAME == "48213"`. The names are
drawn from a fixed list that leaves out `PASSKEY`, the name `dsv3 eval needle` asks for, so the evaluation
tests retrieval of a name the model never trained on.
"""

from __future__ import annotations

import ast
import random
from collections import defaultdict
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

NAMES = ("SECRET", "API_TOKEN", "ACCESS_CODE", "PIN_CODE", "MAGIC_NUMBER", "BUILD_ID", "LICENSE_KEY", "SEED_VALUE",
         "TICKET", "VOUCHER", "SERIAL", "UNLOCK_CODE", "ORDER_ID", "SESSION_KEY", "RUN_ID", "CHECKSUM")
COMMENTS = ("", "  # remember this value", "  # needed later", "  # keep this", "  # the key")


def _imports(text: str, siblings: set[str], package: str) -> set[str]:
    """Sibling module names that `text` imports."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return set()
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.add(a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if (node.level == 1 and not mod) or (node.level == 0 and package and mod == package):
                out.update(a.name for a in node.names)
            elif node.level == 1:
                out.add(mod.split(".")[0])
            elif node.level == 0 and package and mod.startswith(package + "."):
                out.add(mod[len(package) + 1:].split(".")[0])
            elif node.level == 0:
                out.add(mod.split(".")[0])
    return out & siblings


def import_order(texts: dict[str, str], package: str = "") -> list[str]:
    """Module names of one directory (`texts`: stem -> source), each after the siblings it imports; among the ready
    ones by name, `__init__` after its ready siblings (it usually imports them); a cycle is broken at the module
    with the fewest unmet imports."""
    names = set(texts)
    deps = {n: _imports(t, names, package) - {n} for n, t in texts.items()}
    done: list[str] = []
    left = set(names)
    key = lambda n: (n == "__init__", n)  # noqa: E731
    while left:
        ready = sorted((n for n in left if not (deps[n] & left)), key=key)
        pick = ready[0] if ready else min(left, key=lambda n: (len(deps[n] & left), key(n)))
        done.append(pick)
        left.discard(pick)
    return done


def package_documents(files: list[tuple[str, Path]], min_chars: int = 20_000, max_chars: int = 2_000_000,
                      progress: bool = False) -> Iterator[tuple[str, str]]:
    """(name, text) per directory of `files` ((relative path, file) pairs) whose modules hold at least
    `min_chars` characters, in import order; a directory longer than `max_chars` is cut into several documents at
    file boundaries."""
    by_dir: dict[str, dict[str, tuple[str, Path]]] = defaultdict(dict)
    for rel, path in files:
        r = Path(rel)
        by_dir[str(r.parent)][r.stem] = (rel, path)
    for d in tqdm(sorted(by_dir), desc="packages", unit="dir", disable=not progress):
        texts = {}
        for stem, (rel, path) in by_dir[d].items():
            try:
                texts[stem] = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
        if sum(len(t) for t in texts.values()) < min_chars:
            continue
        parts, size, k = [], 0, 0
        for stem in import_order(texts, Path(d).name):
            piece = f"# file: {by_dir[d][stem][0]}\n{texts[stem].rstrip()}\n\n"
            if parts and size + len(piece) > max_chars:
                yield f"{d}#{k}", "".join(parts)
                parts, size, k = [], 0, k + 1
            parts.append(piece)
            size += len(piece)
        if parts:  # the last piece of a cut directory too, however short
            yield f"{d}#{k}", "".join(parts)


def passkey_document(text: str, rng: random.Random, min_chars: int, max_chars: int, needles: int = 1) -> str:
    """A stretch of `text` (whole lines, between `min_chars` and `max_chars`) with `needles` lines `NAME = "12345"` (distinct
    names) at random line starts and, at the end, `assert NAME == "12345"` for each in a random order: several needles
    give a retrieval example per assert, and an assert that must skip the other names' keys."""
    size = rng.randint(min_chars, min(max_chars, len(text)))
    start = rng.randint(0, len(text) - size)
    start = text.rfind("\n", 0, start) + 1
    lines = text[start:start + size].split("\n")[:-1] or [""]
    if needles == 1:  # the single-needle draw order of the corpora built before `needles` existed
        name, key = rng.choice(NAMES), f"{rng.randint(0, 99999):05d}"
        at = rng.randint(0, len(lines))
        lines.insert(at, f'{name} = "{key}"{rng.choice(COMMENTS)}')
        return "\n".join(lines) + f'\n\nassert {name} == "{key}"\n'
    if not 1 <= needles <= len(NAMES):
        raise ValueError(f"needles must be 1 to {len(NAMES)}, got {needles}")
    pairs = [(name, f"{rng.randint(0, 99999):05d}") for name in rng.sample(NAMES, needles)]
    for name, key in pairs:
        lines.insert(rng.randint(0, len(lines)), f'{name} = "{key}"{rng.choice(COMMENTS)}')
    rng.shuffle(pairs)
    return "\n".join(lines) + "\n\n" + "".join(f'assert {name} == "{key}"\n' for name, key in pairs)


def passkey_documents(texts: list[str], count: int, min_chars: int, max_chars: int,
                      seed: int = 0, needles: int = 1) -> Iterator[str]:
    """`count` passkey documents over stretches of `texts` (each long enough; drawn in proportion to length)."""
    pool = [t for t in texts if len(t) >= min_chars]
    if not pool:
        raise ValueError(f"no document holds {min_chars} characters for a passkey stretch")
    rng = random.Random(seed)
    weights = [len(t) for t in pool]
    for _ in range(count):
        yield passkey_document(rng.choices(pool, weights)[0], rng, min_chars, max_chars, needles)
