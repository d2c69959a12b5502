"""Does the chat-tuned model answer "write a Python function that ..." with code?

The instructions are mined from the held-out split exactly as the training pairs are mined from
the train split (`dsv3 data instructions`), so the functions asked for were never trained on.
An answer counts when the code in it (the first fenced block, else the whole answer) parses with
`ast` and defines a function.
"""

from __future__ import annotations

import ast
import random
import re
from pathlib import Path
from typing import Callable

from dsv3.data.instructions import mine

FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def heldout_instructions(files: list[tuple[str, Path]], n: int, seed: int,
                         fits: Callable[[str], bool] | None = None, seen: set[str] | None = None) -> list[dict]:
    """`n` "write a function" records of the held-out files, drawn with `seed`; with `fits`, only
    those whose reference answer it accepts (the eval keeps answers that fit the token budget); with
    `seen` (normalised heads of the train split's functions), none of a function the model trained on."""
    recs, _ = mine(files)
    describe = [r for r in recs if r["meta"]["kind"] == "describe"
                and (seen is None or " ".join(r["meta"]["head"].split()) not in seen)
                and (fits is None or fits(next(m["content"] for m in r["messages"] if m["role"] == "assistant")))]
    return random.Random(seed).sample(describe, min(n, len(describe)))


def extract_code(answer: str) -> str:
    """The first ```python block (an unclosed one runs to the end), else the answer itself."""
    m = FENCE.search(answer)
    return m.group(1) if m else answer


def judge(answer: str, name: str | None = None) -> dict:
    code = extract_code(answer)
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return {"parses": False, "has_def": False, "ok": False, "right_name": False}
    defs = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return {"parses": True, "has_def": bool(defs), "ok": bool(defs), "right_name": name in defs}


def evaluate(llm, recs: list[dict], max_tokens: int = 256, examples: int = 5) -> dict:
    from dsv3.engine.sampling import SamplingParams

    convs = [[m for m in r["messages"] if m["role"] != "assistant"] for r in recs]
    outs = llm.chat(convs, SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=True)
    rows = []
    for r, conv, o in zip(recs, convs, outs):
        name = r["meta"]["qualname"].rsplit(".", 1)[-1]
        rows.append({"instruction": conv[-1]["content"], "answer": o.outputs[0].text, **judge(o.outputs[0].text, name),
                     "hit_max_tokens": o.outputs[0].finish_reason == "length"})
    n = len(rows)
    return {"n": n, "parse_rate": sum(r["ok"] for r in rows) / n, "parses_any": sum(r["parses"] for r in rows) / n,
            "hit_max_tokens": sum(r["hit_max_tokens"] for r in rows) / n,
            "right_name_rate": sum(r["right_name"] for r in rows) / n, "target": 0.6,
            "examples": [r for r in rows if r["ok"]][:examples] + [r for r in rows if not r["ok"]][:max(1, examples // 2)]}
