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


def forced_call_spec(tools: list[Any], tool_choice: Any) -> dict[str, Any]:
    """The `tool_call` grammar spec for exactly one call of the chosen function ('required': any of them)."""
    if tool_choice == "required":
        chosen = tools
    else:
        chosen = [t for t in tools if t.function.name == tool_choice.function.name]
        if not chosen:
            raise APIError(400, f"'tool_choice' names function {tool_choice.function.name!r}, which is not in 'tools'",
                           param="tool_choice")
    return {"calls": [[CALLS_BEGIN + CALL_BEGIN + "function" + SEP + t.function.name + "\n```json\n",
                       t.function.parameters or {"type": "object"}, "\n```" + CALL_END + CALLS_END] for t in chosen]}


def forced_call_grammar(backend: Any, tools: list[Any], tool_choice: Any):
    """The compiled grammar of `forced_call_spec` (blocking; the server uses `compile_async`)."""
    return backend.compile("tool_call", forced_call_spec(tools, tool_choice), param="tools")
