"""Grammar compilation in a process of its own, so a costly schema can be stopped.

xgrammar's compiler releases the GIL, so a thread would keep the event loop free -- but a thread
cannot be stopped: a 45-byte schema (`"pattern": "^a{1,30000}$"`) keeps a core busy for over a
minute. Compiling in a child process lets the server kill it at its time budget and start a new
one. The child is a plain `python -m dsv3.serve.grammar_worker FD` (not a multiprocessing spawn,
which would re-import the embedding program's main module) talking over one end of a socket
pair; it gets the tokenizer info as xgrammar's JSON and sends back the compiled grammar the same
way (a few KB; deserializing it takes under a millisecond).

Specs are plain data (`kind`, `text`), so the child builds every grammar itself:
`json_object`, `json_schema` (text: the schema), `regex`, `ebnf`, `choice` (text: a JSON list of
strings) and `tool_call` (text: JSON `{"begin", "calls": [[prefix, schema, suffix], ...], "end",
"max_calls"}`: `begin`, one to `max_calls` literal-schema-literal calls, `end`).
"""

from __future__ import annotations

import json
import re
import sys
from multiprocessing.connection import Connection
from typing import Any


def build(xgr: Any, compiler: Any, kind: str, text: str) -> Any:
    """Compile one spec with an xgrammar `GrammarCompiler`."""
    if kind == "json_object":  # any object (OpenAI's json_object mode), compact
        return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
    if kind == "json_schema":
        return compiler.compile_json_schema(text, any_whitespace=False, strict_mode=True)
    if kind == "regex":
        return compiler.compile_regex(text)
    if kind == "ebnf":
        return compiler.compile_grammar(xgr.Grammar.from_ebnf(text))
    if kind == "tool_call":  # begin, then 1..max_calls of the calls (each literal-schema-literal), then end
        spec = json.loads(text)
        lit = lambda s: xgr.Grammar.from_ebnf("root ::= " + json.dumps(s, ensure_ascii=False))  # noqa: E731
        alts = [xgr.Grammar.concat(lit(prefix), xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True),
                                   lit(suffix)) for prefix, schema, suffix in spec["calls"]]
        call = alts[0] if len(alts) == 1 else xgr.Grammar.union(*alts)
        rest = lit(spec["end"])
        for _ in range(int(spec.get("max_calls", 1)) - 1):  # end | call rest: unrolled, xgrammar has no repetition here
            rest = xgr.Grammar.union(lit(spec["end"]), xgr.Grammar.concat(call, rest))
        return compiler.compile_grammar(xgr.Grammar.concat(lit(spec["begin"]), call, rest))
    if kind == "choice":  # text: a JSON list of strings, one of which is the whole output
        options = [xgr.Grammar.from_ebnf("root ::= " + json.dumps(c, ensure_ascii=False)) for c in json.loads(text)]
        return compiler.compile_grammar(options[0] if len(options) == 1 else xgr.Grammar.union(*options))
    raise ValueError(f"unknown grammar kind {kind!r}")


_LOCATION = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")  # xgrammar's "[01:49:51] /project/cpp/x.cc:5082: "


def first_line(e: BaseException) -> str:
    """xgrammar's message without its timestamp and C++ source location."""
    text = str(e).strip()
    return _LOCATION.sub("", text.splitlines()[-1] if text else type(e).__name__)[:300]


def serve(conn: Connection) -> None:
    """The child's loop: first the tokenizer info, then ("compile", kind, text) -> ("ok", JSON) | ("error", message)."""
    import xgrammar as xgr

    info = xgr.TokenizerInfo.deserialize_json(conn.recv())
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    conn.send(("ready", ""))
    while True:
        try:
            _, kind, text = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(("ok", build(xgr, compiler, kind, text).serialize_json()))
        except Exception as e:  # xgrammar reports bad schemas with assorted exception types
            conn.send(("error", first_line(e)))


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])))
