"""Tool calls in DeepSeek-V3's own format, translated to and from OpenAI's `tools` / `tool_calls`.

The model writes calls as
`<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`
(the format its chat template renders for past calls). `tool_choice` "required" or a named function
forces that shape with a grammar whose ARGS part is the function's JSON schema: one call for a named
function or `parallel_tool_calls: false`, else one to `MAX_PARALLEL_CALLS`.

Under that grammar a `ToolCallGuide` decides where the markers go. The markers are single tokens
whose text a JSON string may also hold, so the grammar alone would let a marker token into an
argument (and a model that writes markers eagerly fills its strings with them). The guide looks at
where the output is: inside ARGS every marker token and raw control character is masked (JSON
strings cannot hold raw control characters; the marker's text can still be spelled out character by
character); in the fixed layout around ARGS, where the grammar's forced text begins with a marker,
the marker token is the only choice, so it is written as its single token and parses by id.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import torch

from dsv3.serve.errors import APIError

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
ARGS_OPEN, ARGS_CLOSE = "\n```json\n", "\n```"
MAX_PARALLEL_CALLS = 8  # calls one forced "required" reply may hold with parallel_tool_calls
_CALL = re.compile(re.escape(CALL_BEGIN) + r"(?P<type>[^<]*?)" + re.escape(SEP) + r"(?P<name>[^\n]*)\n```json\n(?P<args>.*?)\n```"
                   + re.escape(CALL_END), re.S)
_BODY = re.compile(r"(?P<name>[^\n]*)\n```json\n(?P<args>.*)\n```\s*", re.S)


def tools_system_prompt(tools: list[Any]) -> str:
    """Describe the functions to the model (DeepSeek-V3's template renders no tool list itself)."""
    specs = [t.function.model_dump(exclude_none=True) for t in tools]
    return ("You can call these functions. To call one, reply with " + CALLS_BEGIN + CALL_BEGIN + "function" + SEP
            + "NAME\n```json\nARGUMENTS\n```" + CALL_END + CALLS_END + ".\n## Functions\n"
            + "\n".join(json.dumps(s, ensure_ascii=False) for s in specs))


def _call(name: str, args: str) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name.strip(), "arguments": args.strip()}}


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split raw output text (special tokens kept) into visible content and OpenAI `tool_calls`."""
    start = text.find(CALLS_BEGIN)
    if start < 0:
        return text, []
    calls = [_call(m.group("name"), m.group("args")) for m in _CALL.finditer(text, start)]
    if not calls:
        return text, []
    content = text[:start]
    return (content or None), calls


def parse_tool_call_ids(tokenizer: Any, ids: list[int]) -> tuple[str | None, list[dict[str, Any]]]:
    """Split generated token ids into content and `tool_calls`, cutting at the marker *tokens*: an argument
    that spells a marker's text out character by character stays an argument. Falls back to the text parser
    when the markers are not single tokens of this vocabulary."""
    begin, one, end, sep = (tokenizer.token_to_id(m) for m in (CALLS_BEGIN, CALL_BEGIN, CALL_END, SEP))
    if None in (begin, one, end, sep):
        return parse_tool_calls(tokenizer.decode(ids, skip_special_tokens=False))
    if begin not in ids:
        return tokenizer.decode(ids), []
    start = ids.index(begin)
    calls, i = [], start + 1
    while one in ids[i:]:
        i = ids.index(one, i) + 1
        if end not in ids[i:]:
            break
        j = ids.index(end, i)
        seg = ids[i:j]
        i = j + 1
        if sep not in seg:
            continue
        k = seg.index(sep)
        m = _BODY.fullmatch(tokenizer.decode(seg[k + 1:], skip_special_tokens=False))
        if m is not None:
            calls.append(_call(m.group("name"), m.group("args")))
    if not calls:
        return tokenizer.decode(ids), []
    content = tokenizer.decode(ids[:start])
    return (content or None), calls


def marker_ids(tokenizer: Any) -> list[int]:
    """Ids of the tool-call markers that are single tokens in this vocabulary."""
    ids = (tokenizer.token_to_id(m) for m in (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP))
    return [i for i in ids if i is not None]


def forced_call_spec(tools: list[Any], tool_choice: Any, parallel: bool | None = None) -> dict[str, Any]:
    """The `tool_call` grammar spec: calls of the chosen function ('required': any of them), exactly one for a
    named function or `parallel` False, else one to MAX_PARALLEL_CALLS."""
    if tool_choice == "required":
        chosen = tools
    else:
        chosen = [t for t in tools if t.function.name == tool_choice.function.name]
        if not chosen:
            raise APIError(400, f"'tool_choice' names function {tool_choice.function.name!r}, which is not in 'tools'",
                           param="tool_choice")
    many = tool_choice == "required" and parallel is not False
    return {"begin": CALLS_BEGIN, "end": CALLS_END, "max_calls": MAX_PARALLEL_CALLS if many else 1,
            "calls": [[CALL_BEGIN + "function" + SEP + t.function.name + ARGS_OPEN, t.function.parameters or {"type": "object"},
                       ARGS_CLOSE + CALL_END] for t in chosen]}


def forced_call_grammar(backend: Any, tools: list[Any], tool_choice: Any, parallel: bool | None = None):
    """The compiled grammar of `forced_call_spec` (blocking; the server uses `compile_async`)."""
    return backend.compile("tool_call", forced_call_spec(tools, tool_choice, parallel), param="tools")


class ToolCallGuide:
    """A `GrammarProcessor` guide for forced tool calls: where marker tokens and newlines may go (module doc)."""

    def __init__(self, tokenizer: Any, control: torch.Tensor, args_open: str = ARGS_OPEN, args_close: str = "\n"):
        # args_open / args_close: the text around the JSON arguments (V3: the ```json fence; V3.1: nothing before
        # them and the <｜tool▁call▁end｜> marker after, see tool_formats.guide_layout)
        self.args_open, self.args_close = args_open, args_close
        self.tok = tokenizer
        self.control = control  # tokens holding any control character, newline included
        self.markers = {i: tokenizer.decode([i], skip_special_tokens=False) for i in marker_ids(tokenizer)}
        self.marker_ids = torch.tensor(sorted(self.markers), dtype=torch.long)
        self.sep = tokenizer.token_to_id(SEP)

    def in_arguments(self, out: list[int]) -> bool:
        """Whether the next token continues a call's JSON arguments."""
        if self.sep is not None:
            last = next((k for k in range(len(out) - 1, -1, -1) if out[k] in self.markers), None)
            if last is None or out[last] != self.sep:
                return False
            tail = self.tok.decode(out[last + 1:], skip_special_tokens=False)
        else:  # markers spelled over several tokens: find them in the text
            text = self.tok.decode(out, skip_special_tokens=False)
            cut = max(text.rfind(m) for m in (CALLS_BEGIN, CALL_BEGIN, CALL_END, SEP))
            if cut < 0 or not text.startswith(SEP, cut):
                return False
            tail = text[cut + len(SEP):]
        k = tail.find(self.args_open)
        return k >= 0 and "\n" not in tail[k + len(self.args_open):]  # compact JSON holds no raw newline

    def __call__(self, out: list[int], matcher: Any, head: torch.Tensor) -> torch.Tensor:
        forced = matcher.find_jump_forward_string()  # the text the grammar allows next, whatever is sampled
        width = head.shape[-1]
        closing = bool(forced) and forced.startswith(self.args_close)
        if self.in_arguments(out) and not (closing and self.args_close in self.markers.values()):
            if not closing:  # the arguments are complete only when the closing text is forced
                head = head.masked_fill(self.control[:width], float("-inf"))
            if len(self.marker_ids):
                head[0, self.marker_ids[self.marker_ids < width]] = float("-inf")
            return head
        if forced:
            ok = [i for i, t in self.markers.items() if i < width and bool(torch.isfinite(head[0, i]))
                  and (forced.startswith(t) or t.startswith(forced))]
            if ok:
                only = torch.full_like(head, float("-inf"))
                only[0, ok] = head[0, ok]
                head = only
        return head
