"""What a coding assistant is asked to do: finish a function from its signature + docstring, fill in one line.

Function completion: the prompt is what a user types (decorators, `def` line(s), docstring,
dedented), the model continues greedily, the continuation is cut where the function ends (the
first non-blank line back at the `def`'s indentation) and the result must parse with `ast`.
Single-line fill-in-the-middle: the prefix is the file up to a held-out line, the suffix
everything after it; the model writes the middle (the whole line, indentation included) until a
newline. Both prompts end right after a newline: in this tokenizer's training text a newline ends
a token (`):` + newline, a docstring's closing quotes + newline) and the next line's indentation
starts one, so the model is asked at a token boundary it has seen, not in the middle of one.
"""

from __future__ import annotations

import ast
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dsv3.data.instructions import FunctionSite, iter_functions


def normalized(text: str) -> str:
    return " ".join(text.split())


def seen_heads(files: list[tuple[str, Path]]) -> set[str]:
    """Whitespace-normalised heads (decorators, signature, docstring) of every documented function in
    `files` (the train split). A held-out file can repeat a train file's function verbatim
    (transformers' "Copied from" code: 20 of 100 held-out functions drawn without this check), and
    such a function is not unseen."""
    out = set()
    for rel, path in files:
        out.update(normalized(s.head) for s in iter_functions(path.read_text(encoding="utf-8", errors="replace"), rel))
    return out


def function_sites(files: list[tuple[str, Path]], n: int, seed: int, max_head_chars: int = 1500,
                   fits: Callable[[FunctionSite], bool] | None = None, seen: set[str] | None = None) -> list[FunctionSite]:
    """`n` documented functions with a body beyond the docstring, drawn with `seed` from all of `files`;
    with `fits`, only those it accepts (the eval keeps functions whose own body fits the token budget);
    with `seen`, none whose head it holds."""
    sites = []
    for rel, path in sorted(files):
        sites += [s for s in iter_functions(path.read_text(encoding="utf-8"), rel)
                  if s.body_lines >= 1 and len(s.head) <= max_head_chars and (fits is None or fits(s))
                  and (seen is None or normalized(s.head) not in seen)]
    return random.Random(seed).sample(sites, min(n, len(sites)))


def body_fits(tok, max_tokens: int) -> Callable[[FunctionSite], bool]:
    """True for a function whose written body is at most `max_tokens` tokens: one the budget lets even
    a perfect completion finish. (Of 100 held-out functions drawn without it, 60 have longer bodies.)"""
    return lambda s: len(tok.encode(s.source[len(s.head):], add_special_tokens=False)) <= max_tokens


def function_prompt(site: FunctionSite) -> str:
    """The head, ending with the newline after the docstring: the body's first token is its indentation."""
    return site.head


def cut_function(prompt: str, completion: str) -> str:
    """`prompt + completion` up to the first non-blank line at column 0 after the prompt (the function's end)."""
    lines = (prompt + completion).splitlines(keepends=True)
    start = len(prompt.splitlines())  # lines the prompt holds (its last one may be continued by the completion)
    for i in range(start, len(lines)):
        if lines[i].strip() and not lines[i][0].isspace():
            return "".join(lines[:i])
    return "".join(lines)


def parse_function(code: str) -> tuple[bool, bool]:
    """(parses with ast, its first function has a statement after the docstring)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False, False
    fn = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    return True, fn is not None and len(fn.body) > 1


@dataclass
class FimItem:
    """One held-out line to fill in: the full prefix and suffix, and the expected middle."""

    path: str
    lineno: int
    prefix: str
    middle: str
    suffix: str


def _trivial(stripped: str) -> bool:
    return len(stripped) < 10 or stripped.startswith("#") or not any(c.isalnum() for c in stripped)


def fim_items(files: list[tuple[str, Path]], n: int, seed: int) -> list[FimItem]:
    """`n` non-blank, non-trivial lines (>= 10 characters, not comments) drawn with `seed` from all of `files`."""
    cands = []
    texts = {}
    for rel, path in sorted(files):
        text = texts[rel] = path.read_text(encoding="utf-8")
        for i, line in enumerate(text.split("\n")):
            if not _trivial(line.strip()):
                cands.append((rel, i))
    out = []
    for rel, i in random.Random(seed).sample(cands, min(n, len(cands))):
        lines = texts[rel].split("\n")
        prefix = "".join(x + "\n" for x in lines[:i])
        suffix = "\n" + "\n".join(lines[i + 1:])
        out.append(FimItem(rel, i + 1, prefix, lines[i], suffix))
    return out


def trim(tok, prefix: str, suffix: str, prefix_tokens: int, suffix_tokens: int) -> tuple[str, str]:
    """Keep the prefix's last and the suffix's first whole lines within token budgets (the line being filled stays)."""
    head, _, current = prefix.rpartition("\n")
    kept, used = [], len(tok.encode(current, add_special_tokens=False))
    for line in reversed(head.split("\n") if head else []):
        used += len(tok.encode(line + "\n", add_special_tokens=False))
        if used > prefix_tokens:
            break
        kept.append(line + "\n")
    new_prefix = "".join(reversed(kept)) + current
    lines, used, out = suffix.split("\n"), 0, []
    for j, line in enumerate(lines):
        piece = line if j == 0 else "\n" + line
        used += len(tok.encode(piece, add_special_tokens=False))
        if used > suffix_tokens:
            break
        out.append(piece)
    return new_prefix, "".join(out)


def fim_prompt_ids(tok, prefix: str, suffix: str) -> list[int]:
    """BOS <｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜>: the layout of training and of `/v1/completions`."""
    fim = tok.fim_tokens
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    return (bos + [fim.prefix] + tok.encode(prefix, add_special_tokens=False) + [fim.suffix]
            + tok.encode(suffix, add_special_tokens=False) + [fim.middle])


def edit_similarity(a: str, b: str) -> float:
    """1 - Levenshtein distance / the longer length (CodeXGLUE's line-completion "Edit Sim", as a fraction)."""
    if not a and not b:
        return 1.0
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return 1.0 - prev[-1] / max(len(a), len(b))


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].rstrip()
