"""Tool calls in DeepSeek-V3's own format, translated to and from OpenAI's `tools` / `tool_calls`.

The model writes calls as
`<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`
(the format its chat template renders for past calls). `tool_choice` "required" or a named function
forces that shape with a grammar whose ARGS part is the function's JSON schema.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from dsv3.serve.errors import APIError

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
_CALL = re.compile(re.escape(CALL_BEGIN) + r"(?P<type>[^<]*?)" + re.escape(SEP) + r"(?P<name>[^\n]*)\n```json\n(?P<args>.*?)\n```"
                   + re.escape(CALL_END), re.S)


def tools_system_prompt(tools: list[Any]) -> str:
    """Describe the functions to the model (DeepSeek-V3's template renders no tool list itself)."""
    specs = [t.function.model_dump(exclude_none=True) for t in tools]
    return ("You can call these functions. To call one, reply with " + CALLS_BEGIN + CALL_BEGIN + "function" + SEP
            + "NAME\n```json\nARGUMENTS\n```" + CALL_END + CALLS_END + ".\n## Functions\n"
            + "\n".join(json.dumps(s, ensure_ascii=False) for s in specs))


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split raw output (special tokens kept) into visible content and OpenAI `tool_calls`."""
    start = text.find(CALLS_BEGIN)
    if start < 0:
        return text, []
    calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
              "function": {"name": m.group("name").strip(), "arguments": m.group("args").strip()}}
             for m in _CALL.finditer(text, start)]
    if not calls:
        return text, []
    content = text[:start]
    return (content or None), calls


def marker_ids(tokenizer: Any) -> list[int]:
    """Ids of the tool-call markers that are single tokens in this vocabulary."""
    ids = (tokenizer.token_to_id(m) for m in (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP))
    return [i for i in ids if i is not None]


def _ebnf_literal(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def forced_call_grammar(backend: Any, tools: list[Any], tool_choice: Any):
    """A grammar for exactly one call of the chosen function ('required': any of them)."""
    xgr = backend.xgr
    if tool_choice == "required":
        chosen = tools
    else:
        chosen = [t for t in tools if t.function.name == tool_choice.function.name]
        if not chosen:
            raise APIError(400, f"'tool_choice' names function {tool_choice.function.name!r}, which is not in 'tools'",
                           param="tool_choice")
    alts = []
    for t in chosen:
        schema = t.function.parameters or {"type": "object"}
        try:
            args = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
        except Exception as e:
            raise APIError(400, f"the parameters schema of tool {t.function.name!r} is invalid: {str(e).splitlines()[0][:200]}",
                           param="tools") from None
        head = xgr.Grammar.from_ebnf("root ::= " + _ebnf_literal(CALLS_BEGIN + CALL_BEGIN + "function" + SEP
                                                                  + t.function.name + "\n```json\n"))
        tail = xgr.Grammar.from_ebnf("root ::= " + _ebnf_literal("\n```" + CALL_END + CALLS_END))
        alts.append(xgr.Grammar.concat(head, args, tail))
    grammar = alts[0] if len(alts) == 1 else xgr.Grammar.union(*alts)
    return backend.compile_grammar(grammar)
