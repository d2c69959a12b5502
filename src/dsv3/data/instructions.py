"""Instruction pairs mined with `ast` from Python sources: what turns a code model into a chat one.

A function with a docstring is a ready-made instruction: its summary line says what to write, its
signature says how to call it, its source is the answer. Each kept function gives two chat records
in the form `dsv3 finetune` reads (`{"messages": [...]}`): "write a function `f(args)` that <summary>",
answered with the function whose docstring is cut to that summary, and "complete this signature +
docstring", answered with the whole function; both in a ```python block.
Files come from one split of a shard manifest, so the held-out split gives evaluation instructions
for functions the model never saw. Every choice (phrasing, order) is a pure function of the input.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from dsv3.data.shards import DataError, load_manifest

# Imperative first words of PEP 257 summaries ("Return the ...") that become "returns the ...".
VERBS = frozenset("""add append apply assign build calculate call check clear close compare compute concatenate construct convert
copy count create decode decorate define delete determine emit encode ensure evaluate execute extract fetch fill
find format generate get handle initialize insert iterate invoke join list load log look make map match merge
normalize open pad parse perform prepare print process produce raise read receive register remove render replace
reset resolve restore retrieve return run save search select send set sort split start stop store strip
synchronize take test transform translate try update validate verify wait walk wrap write yield""".split())
THAT = ("Write a Python function `{sig}` that {s}.", "Implement `{sig}` in Python: a function that {s}.",
        "Write a function `{sig}` that {s}.", "Create a Python function `{sig}` that {s}.")
PLAIN = ("Write a Python function `{sig}`. It should do this: {S}.", "Implement the Python function `{sig}`: {S}.")
COMPLETE = ("Complete this Python function:\n\n```python\n{head}```", "Write the body of this function:\n\n```python\n{head}```",
            "Finish the implementation:\n\n```python\n{head}```")


@dataclass
class FunctionSite:
    """One function with a docstring, dedented: `head` is what a user types, `source` the whole thing."""

    path: str
    qualname: str
    signature: str  # name(args), as written
    summary: str    # the docstring's summary sentence, as written
    head: str       # decorators + def line(s) + docstring, ending with a newline
    source: str     # the whole function, ending with a newline
    body_lines: int  # non-blank lines after the docstring
    lineno: int
    node: ast.AST


def brief(site: FunctionSite) -> str:
    """The function with its docstring cut to the summary sentence: the answer to "write a function
    that <summary>". Shorter answers teach a small model to finish (and close the block) before
    its token budget; a long docstring would only be recited. The full source when cutting fails."""
    doc = site.node.body[0]
    first = doc.lineno - min([site.node.lineno] + [d.lineno for d in site.node.decorator_list])
    head = site.head.splitlines(keepends=True)
    if first < 1 or first >= len(head) or '"""' in site.summary or site.summary.endswith("\\"):
        return site.source
    indent = head[first][: len(head[first]) - len(head[first].lstrip())]
    text = "".join(head[:first]) + f'{indent}"""{site.summary}."""\n' + site.source[len(site.head):]
    try:
        ast.parse(text)
    except SyntaxError:
        return site.source
    return text


def _dedent(lines: list[str], indent: str) -> str | None:
    out = []
    for line in lines:
        if line.startswith(indent):
            out.append(line[len(indent):])
        elif not line.strip():
            out.append("\n")
        else:
            return None  # a string literal reaching left of the def: cannot be dedented faithfully
    text = "".join(out)
    return text if text.endswith("\n") else text + "\n"


def summary_of(docstring: str) -> str:
    """First sentence of the docstring's first paragraph, without its final period."""
    para = inspect.cleandoc(docstring).split("\n\n")[0]
    text = " ".join(line.strip() for line in para.splitlines())
    cut = text.find(". ")
    return (text[:cut] if cut >= 0 else text).strip().rstrip(".:").strip()


def _walk(body: list[ast.stmt], prefix: str = "") -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
        elif isinstance(node, ast.ClassDef):
            yield from _walk(node.body, f"{prefix}{node.name}.")


def _args_as_written(head: str, node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The parameter list as the author spelled it, on one line (ast.unparse would respace `x: int = 1`)."""
    start = head.find(f"def {node.name}(")
    if start < 0:
        return ast.unparse(node.args)
    depth, i = 0, start + len(node.name) + 4
    for i in range(i, len(head)):
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(head[i], 0)
        if depth == 0:
            break
    text = " ".join(head[start + len(node.name) + 5:i].split()).rstrip(",").strip()
    text = text.replace("( ", "(").replace("[ ", "[").replace(" )", ")").replace(" ]", "]").replace(", )", ")")
    try:
        ast.parse(f"def f({text}): pass")
    except SyntaxError:  # a bracket inside a default string: fall back to the canonical spelling
        return ast.unparse(node.args)
    return text


def iter_functions(text: str, path: str = "") -> Iterator[FunctionSite]:
    """Top-level functions and methods (of top-level or nested classes) that have a docstring."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    lines = text.splitlines(keepends=True)
    for qualname, node in _walk(tree.body):
        doc = ast.get_docstring(node, clean=False)
        if not doc or not node.body or node.end_lineno is None:
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        indent = lines[node.lineno - 1][:node.col_offset]
        if indent.strip():
            continue  # `class A: def f(self): ...` on one line
        head = _dedent(lines[start:node.body[0].end_lineno], indent)
        source = _dedent(lines[start:node.end_lineno], indent)
        if head is None or source is None or not source.startswith(head):
            continue
        try:
            parsed = ast.parse(head).body
        except SyntaxError:
            continue
        if len(parsed) != 1 or len(parsed[0].body) != 1:
            continue  # code after the docstring on its closing line
        body = sum(1 for line in source[len(head):].splitlines() if line.strip())
        yield FunctionSite(path, qualname, f"{node.name}({_args_as_written(head, node)})", summary_of(doc), head,
                           source, body, node.lineno, node)


def too_large_literal(node: ast.AST, max_str: int = 300, max_items: int = 16) -> bool:
    """A long string/bytes constant (other than the docstring) or a long container display."""
    doc = node.body[0].value if node.body and isinstance(node.body[0], ast.Expr) else None
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, (str, bytes)) and n is not doc and len(n.value) > max_str:
            return True
        if isinstance(n, (ast.List, ast.Tuple, ast.Set)) and len(n.elts) > max_items:
            return True
        if isinstance(n, ast.Dict) and len(n.keys) > max_items:
            return True
    return False


def keep(site: FunctionSite, min_body: int = 2, max_body: int = 40, max_chars: int = 1500) -> bool:
    """The training filter: a real body of 2-40 lines, a bounded size, no huge literals or lines, no ``` fences."""
    return (min_body <= site.body_lines <= max_body and len(site.source) <= max_chars and "```" not in site.source
            and max(len(line) for line in site.source.splitlines()) <= 160 and not too_large_literal(site.node))


def _third_person(word: str) -> str:
    if word.endswith(("s", "sh", "ch", "x", "z", "o")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def describe(site: FunctionSite) -> str | None:
    """The "write a function `f(args)` that ..." instruction, or None when the summary is unusable."""
    s = site.summary
    words = s.split()
    if len(words) < 3 or len(s) > 160 or not s[0].isalpha() or words[0].endswith(":") or ">>>" in s or "`" in s:
        return None
    first = words[0]
    if first[1:].islower() or len(first) == 1:  # not an acronym or CamelCase name: lowercase it
        s = s[0].lower() + s[1:]
    low = first.lower()
    pick = _choice(site, "describe")
    if low in VERBS or (low.endswith("s") and low[:-1] in VERBS) or (low.endswith("es") and low[:-2] in VERBS) \
            or (low.endswith("ies") and low[:-3] + "y" in VERBS):
        if low in VERBS:
            s = _third_person(s.split()[0]) + s[len(first):]
        return THAT[pick % len(THAT)].format(sig=site.signature, s=s)
    return PLAIN[pick % len(PLAIN)].format(sig=site.signature, S=site.summary)


def _choice(site: FunctionSite, kind: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{kind}:{site.path}:{site.qualname}".encode()).digest()[:4], "big")


def fenced(code: str) -> str:
    return f"```python\n{code}```"


def records(site: FunctionSite) -> list[dict]:
    """The chat records of one function: describe -> source, and head -> source."""
    meta = {"path": site.path, "qualname": site.qualname, "lineno": site.lineno}
    out = []
    text = describe(site)
    if text is not None:
        out.append({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": fenced(brief(site))}],
                    "meta": {**meta, "kind": "describe", "head": site.head}})
    prompt = COMPLETE[_choice(site, "complete") % len(COMPLETE)].format(head=site.head)
    out.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": fenced(site.source)}],
                "meta": {**meta, "kind": "complete", "head": site.head}})
    return out


def split_files(shards: str | Path, split: str, inputs: list[str] | None = None) -> list[tuple[str, Path]]:
    """(manifest path, file) of every file of `split`, found under `inputs` (default: those the shards were built from).

    A manifest path is `<input dir name>/<path below it>`; a file that is missing or changed since
    the shards were built stops the run, since its split would be unknown.
    """
    if split not in ("train", "heldout"):
        raise DataError(f"split {split!r} is not one of train, heldout.")
    manifest = load_manifest(shards)
    roots = [Path(r) for r in (inputs or manifest.get("settings", {}).get("inputs", []))]
    by_name = {}
    for root in roots:
        if not root.is_dir():
            raise DataError(f"input directory {root} does not exist.")
        by_name[Path(os.path.abspath(root)).name] = root
    out = []
    for entry in manifest["files"]:
        if entry["split"] != split:
            continue
        name, _, below = entry["path"].partition("/")
        if name not in by_name:
            raise DataError(f"{entry['path']} of {shards}/manifest.json lies under none of the inputs {', '.join(map(str, roots))}.")
        path = by_name[name] / below
        if not path.is_file():
            raise DataError(f"{path} is listed in {shards}/manifest.json but does not exist.")
        if hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
            raise DataError(f"{path} changed since the shards in {shards} were built; rebuild them.")
        out.append((entry["path"], path))
    if not out:
        raise DataError(f"the {split} split of {shards} lists no files.")
    return out


def kept_functions(files: list[tuple[str, Path]], stats: dict, progress: bool = False, desc: str = "mining",
                   **filters) -> Iterator[tuple[str, FunctionSite]]:
    """(source hash, site) of every function in `files` (sorted by path) that passes `keep`, each
    whitespace-normalised source once; counts functions, kept and duplicates into `stats`."""
    from tqdm import tqdm

    seen: set[str] = set()
    stats.update(files=len(files), functions=0, kept=0, duplicates=0)
    for rel, path in tqdm(sorted(files), desc=desc, unit="file", disable=not progress):
        for site in iter_functions(path.read_text(encoding="utf-8", errors="replace"), rel):
            stats["functions"] += 1
            if not keep(site, **filters):
                continue
            key = hashlib.sha256(" ".join(site.source.split()).encode()).hexdigest()
            if key in seen:
                stats["duplicates"] += 1
                continue
            seen.add(key)
            stats["kept"] += 1
            yield key, site


def mine(files: list[tuple[str, Path]], progress: bool = False, **filters) -> tuple[list[dict], dict]:
    """Records of every kept function in `files` (sorted by path), deduplicated by source and instruction."""
    seen_prompt, out, stats = set(), [], {}
    for _, site in kept_functions(files, stats, progress, **filters):
        for rec in records(site):
            prompt = rec["messages"][0]["content"]
            if prompt not in seen_prompt:
                seen_prompt.add(prompt)
                out.append(rec)
    stats["records"] = len(out)
    stats["describe"] = sum(r["meta"]["kind"] == "describe" for r in out)
    return out, stats


def write_jsonl(recs: list[dict], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return out
