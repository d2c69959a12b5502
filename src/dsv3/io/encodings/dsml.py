"""DSML, the tool-call markup of DeepSeek-V3.2 and V4, written and read back.

A call block is
    <｜DSML｜BLOCK>
    <｜DSML｜invoke name="NAME">
    <｜DSML｜parameter name="KEY" string="true|false">VALUE</｜DSML｜parameter>
    ...
    </｜DSML｜invoke>
    </｜DSML｜BLOCK>
where BLOCK is `function_calls` (V3.2) or `tool_calls` (V4). A string argument is written as is with
`string="true"`; anything else as JSON with `string="false"`. Reading follows DeepSeek's
`parse_tool_calls` (the hub's encoding_dsv32.py / encoding_dsv4.py): the same separators, the same
errors for malformed markup; arguments come back as a JSON object string whose values keep their types.
"""

from __future__ import annotations

import json
import re
from typing import Any

DSML = "｜DSML｜"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
THINK_START, THINK_END = "<think>", "</think>"


class DSMLError(ValueError):
    """Model output that is not well-formed DSML."""


def to_json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, UnicodeEncodeError):
        return json.dumps(value, ensure_ascii=True)


def encode_arguments(arguments: str | dict[str, Any]) -> str:
    """A call's arguments (OpenAI's JSON string, or a dict) as DSML parameter lines."""
    try:
        args = json.loads(arguments) if isinstance(arguments, str) and arguments.strip() else arguments or {}
    except ValueError:
        raise DSMLError(f"tool call arguments are not JSON: {arguments[:60]!r}") from None
    if not isinstance(args, dict):
        raise DSMLError(f"tool call arguments must be a JSON object, got {type(args).__name__}")
    return "\n".join(
        f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
        f'{v if isinstance(v, str) else to_json(v)}</{DSML}parameter>' for k, v in args.items())


def encode_calls(calls: list[dict[str, Any]], block: str) -> str:
    """OpenAI `tool_calls` as one DSML block (no leading separator)."""
    invokes = [f'<{DSML}invoke name="{c["function"]["name"]}">\n{encode_arguments(c["function"]["arguments"])}\n</{DSML}invoke>'
               for c in calls]
    return f"<{DSML}{block}>\n" + "\n".join(invokes) + f"\n</{DSML}{block}>"


def _read_until(i: int, text: str, stops: list[str]) -> tuple[int, str, str | None]:
    """(index after the first stop found, the text before it, that stop); no stop: (len, rest, None)."""
    best, hit = len(text), None
    for s in stops:
        p = text.find(s, i)
        if p != -1 and p < best:
            best, hit = p, s
    if hit is None:
        return len(text), text[i:], None
    return best + len(hit), text[i:best], hit


def _decode_arguments(args: dict[str, tuple[str, str]]) -> str:
    parts = [f"{to_json(k)}: {to_json(v) if is_str == 'true' else v}" for k, (v, is_str) in args.items()]
    return "{" + ", ".join(parts) + "}"


def parse_calls(text: str, start: int, block: str) -> tuple[int, list[dict[str, str]]]:
    """Read invokes from `text[start:]` (just after `<｜DSML｜BLOCK`) up to the block's end tag.

    Returns (index after the end tag, [{"name", "arguments"}]); a non-string value that is not JSON raises."""
    end_tag = f"</{DSML}{block}>"
    calls, i = [], start
    while i < len(text):
        i, before, stop = _read_until(i, text, [f"<{DSML}invoke", end_tag])
        if before != ">\n":
            raise DSMLError(f"expected '>\\n' before {stop or 'the end'}, got {before[:40]!r}")
        if stop == end_tag:
            return i, calls
        if stop is None:
            raise DSMLError(f"the {block} block is not closed")
        i, head, stop = _read_until(i, text, [f"<{DSML}parameter", f"</{DSML}invoke"])
        m = re.fullmatch(r'\s*name="(.*?)">\n\n?', head, flags=re.S)  # \n\n: no arguments
        if m is None:
            raise DSMLError(f"malformed invoke name: {head[:60]!r}")
        args: dict[str, tuple[str, str]] = {}
        while stop == f"<{DSML}parameter":
            i, body, stop = _read_until(i, text, [f"/{DSML}parameter"])
            p = re.fullmatch(r' name="(.*?)" string="(true|false)">(.*?)<', body, flags=re.S)
            if p is None:
                raise DSMLError(f"malformed parameter: {body[:60]!r}")
            if p.group(1) in args:
                raise DSMLError(f"parameter {p.group(1)!r} is given twice")
            if p.group(2) == "false":
                try:
                    json.loads(p.group(3))
                except ValueError:
                    raise DSMLError(f"parameter {p.group(1)!r} has string=\"false\" but is not JSON: {p.group(3)[:40]!r}") from None
            args[p.group(1)] = (p.group(3), p.group(2))
            i, sep, stop = _read_until(i, text, [f"<{DSML}parameter", f"</{DSML}invoke"])
            if sep != ">\n":
                raise DSMLError(f"expected '>\\n' after a parameter, got {sep[:40]!r}")
        if stop is None:
            raise DSMLError("an invoke is not closed")
        calls.append({"name": m.group(1), "arguments": _decode_arguments(args)})
    raise DSMLError(f"the {block} block is not closed")


def parse_completion(text: str, thinking: bool, block: str) -> dict[str, Any]:
    """A whole completion (EOS optional) as {"content", "reasoning_content", "tool_calls"} the way DeepSeek's
    `parse_message_from_completion_text` reads it: reasoning up to `</think>` in thinking mode, content up to
    EOS or `\\n\\n<｜DSML｜BLOCK`, then the calls and nothing after them."""
    calls_start = f"\n\n<{DSML}{block}"
    i, reasoning = 0, ""
    if thinking:
        i, reasoning, stop = _read_until(i, text, [THINK_END, calls_start])
        if stop != THINK_END:
            raise DSMLError("thinking mode output has no </think>")
    i, content, stop = _read_until(i, text, [EOS, calls_start])
    calls: list[dict[str, str]] = []
    if stop == calls_start:
        i, calls = parse_calls(text, i, block)
        i, rest, stop = _read_until(i, text, [EOS])
        if rest:
            raise DSMLError(f"text after the tool calls: {rest[:40]!r}")
    if i != len(text):
        raise DSMLError("text after the end of the message")
    for sp in (BOS, EOS, THINK_START, THINK_END, DSML):
        if sp in content or sp in reasoning:
            raise DSMLError(f"unexpected {sp!r} in the message text")
    return {"role": "assistant", "content": content, "reasoning_content": reasoning,
            "tool_calls": [{"type": "function", "function": c} for c in calls]}
