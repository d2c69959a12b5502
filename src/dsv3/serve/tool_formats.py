"""Tool calls and reasoning in each DeepSeek family's own format, for /v1/chat/completions.

`tools.py` holds DeepSeek-V3's format (```json-fenced arguments, parsed by token id, forced by grammar);
this module dispatches on the model's `ChatFormat` (dsv3.io.encodings) for the others:

- V3.1 / V3.1-Terminus / V3.2-Exp: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{json}<｜tool▁call▁end｜>...
  <｜tool▁calls▁end｜>`; the tool list goes in the system prompt as the model card lays it out. Forced calls
  (tool_choice "required" / a named function) use the same grammar as V3 with this layout.
- V3.2 / V4: DSML (`<｜DSML｜function_calls>` / `<｜DSML｜tool_calls>`), rendered by the encoders; arguments are
  typed back from `string="true|false"`. Forced calls are not offered for DSML (a 400 says so): the
  grammar backend constrains JSON, and DSML parameters are not JSON.

Reasoning follows vLLM's deepseek_r1 parser: with thinking on, the prompt ends in `<think>`, so the output
is `REASONING</think>CONTENT`; with no `</think>` yet, everything is reasoning.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from dsv3.io.encodings import DSML_V32, DSML_V4, V3, V31, ChatFormat, split_reasoning  # noqa: F401 (re-exported)
from dsv3.io.encodings import dsv31
from dsv3.io.encodings.dsml import DSML, THINK_END, THINK_START, DSMLError
from dsv3.io.encodings.dsml import parse_calls as parse_dsml_calls
from dsv3.serve import tools as v3
from dsv3.serve.errors import APIError

_V31_CALL = re.compile(re.escape(dsv31.CALL_BEGIN) + r"(?P<name>.*?)" + re.escape(dsv31.SEP) + r"(?P<args>.*?)"
                       + re.escape(dsv31.CALL_END), re.S)
V3_FORMAT = ChatFormat(V3, V3, False, False)
DSML_BLOCKS = {DSML_V32: "function_calls", DSML_V4: "tool_calls"}
THINKING_KEYS = ("thinking", "enable_thinking")
TEMPLATE_KWARGS = (*THINKING_KEYS, "drop_thinking")
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


def _call(name: str, args: str) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name.strip(), "arguments": args.strip()}}


def tool_specs(tools: list[Any]) -> list[dict[str, Any]]:
    """Request tools as plain OpenAI dicts (what templates and encoders read)."""
    return [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in tools]


def prompt_messages(fmt: ChatFormat, messages: list[dict[str, Any]], tools: list[Any] | None) -> tuple[list[dict], list | None]:
    """(messages, tools for the renderer): the tool list goes where the format wants it."""
    if not tools:
        return messages, None
    if fmt.renders_tools:
        return messages, tool_specs(tools)
    if fmt.tool_format == V31:
        return dsv31.with_tools(messages, tool_specs(tools)), None
    return [{"role": "system", "content": v3.tools_system_prompt(tools)}, *messages], None


def template_kwargs(fmt: ChatFormat, req: Any) -> tuple[dict[str, Any], bool]:
    """The chat-template variables of a request and whether the reply opens with reasoning.

    `chat_template_kwargs` may set `thinking` / `enable_thinking` (and `drop_thinking` for the V3.2/V4 encoders);
    vLLM's `reasoning_effort` turns thinking on ("none": off; V4 maps "max" to its max-effort prompt and
    "high"/"xhigh" to "high"). On a model with no thinking mode, asking for one is a 400."""
    kw = dict(req.chat_template_kwargs or {})
    bad = sorted(k for k in kw if k not in TEMPLATE_KWARGS)
    if bad:
        raise APIError(400, f"'chat_template_kwargs' has unknown keys {bad} (known: {list(TEMPLATE_KWARGS)})",
                       param="chat_template_kwargs")
    for k, v in kw.items():
        if not isinstance(v, bool):
            raise APIError(400, f"'chat_template_kwargs.{k}' must be a boolean", param="chat_template_kwargs")
    thinking = any(kw.get(k) for k in THINKING_KEYS)
    effort = req.reasoning_effort
    if effort is not None:
        if effort not in EFFORTS:
            raise APIError(400, f"'reasoning_effort' must be one of {list(EFFORTS)}", param="reasoning_effort")
        if not fmt.thinking:
            raise APIError(400, "'reasoning_effort' is not supported by this model: its chat format has no thinking mode",
                           param="reasoning_effort", code="unsupported_parameter")
        if any(k in kw for k in THINKING_KEYS) and thinking != (effort != "none"):
            raise APIError(400, "'reasoning_effort' contradicts 'chat_template_kwargs.thinking'", param="reasoning_effort")
        thinking = effort != "none"
    if thinking and not fmt.thinking:
        raise APIError(400, "this model's chat format has no thinking mode ('chat_template_kwargs.thinking')",
                       param="chat_template_kwargs", code="unsupported_parameter")
    out: dict[str, Any] = {}
    if fmt.thinking:
        out["thinking"] = thinking
        if "drop_thinking" in kw:
            out["drop_thinking"] = kw["drop_thinking"]
        if fmt.reasoning_effort and thinking:
            out["reasoning_effort"] = {"max": "max", "high": "high", "xhigh": "high"}.get(effort or "")
    return out, thinking


def calls_start(fmt: ChatFormat, text: str) -> int:
    """Where a calls block begins in `text` (DSML: at the blank line before it), or -1."""
    k = text.find(fmt.calls_marker)
    if k > 0 and fmt.tool_format in DSML_BLOCKS and text[:k].endswith("\n\n"):
        k -= 2
    return k


def parse_calls(fmt: ChatFormat, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split reply text (special tokens kept, EOS removed) into content and OpenAI `tool_calls` in the model's format.
    Malformed calls leave the text as content."""
    if fmt.tool_format == V3:
        return v3.parse_tool_calls(text)
    start = calls_start(fmt, text)
    if start < 0:
        return text, []
    body = text[start:]
    if fmt.tool_format == V31:
        calls = [_call(m.group("name"), m.group("args")) for m in _V31_CALL.finditer(body)]
    else:
        block = DSML_BLOCKS[fmt.tool_format]
        k = body.find(f"<{DSML}{block}")
        try:
            _, found = parse_dsml_calls(body, k + len(f"<{DSML}{block}"), block)
        except DSMLError:
            return text, []
        calls = [_call(c["name"], c["arguments"]) for c in found]
    if not calls:
        return text, []
    return (text[:start] or None), calls


def forced_spec(fmt: ChatFormat, tools: list[Any], tool_choice: Any, parallel: bool | None) -> dict[str, Any]:
    """The `tool_call` grammar spec for forced calls, in the model's own layout (V3 and V3.1 formats)."""
    if fmt.tool_format == V3:
        return v3.forced_call_spec(tools, tool_choice, parallel)
    if fmt.tool_format != V31:
        raise APIError(400, "'tool_choice' \"required\" or a named function is not supported for this model's DSML "
                            "tool-call format (DeepSeek-V3.2 / V4): use \"auto\"", param="tool_choice",
                       code="unsupported_parameter")
    spec = v3.forced_call_spec(tools, tool_choice, parallel)
    names = [t.function.name for t in tools] if tool_choice == "required" else [tool_choice.function.name]
    spec["begin"], spec["end"] = dsv31.CALLS_BEGIN, dsv31.CALLS_END
    spec["calls"] = [[dsv31.CALL_BEGIN + name + dsv31.SEP, schema, dsv31.CALL_END]
                     for name, (_, schema, _) in zip(names, spec["calls"])]
    return spec


def guide_layout(spec: dict[str, Any]) -> dict[str, str]:
    """`ToolCallGuide` keyword arguments for a forced-call spec's layout around the JSON arguments."""
    if spec["calls"] and spec["calls"][0][2] == dsv31.CALL_END:  # V3.1: nothing between the separator and the JSON
        return {"args_open": "", "args_close": dsv31.CALL_END}
    return {}


class StreamSplitter:
    """Turns the growing text of one streamed choice into what may be sent so far: (reasoning, content) prefixes
    that never change once sent. Text that might be the start of `</think>` or of the calls marker is held back
    until it is decided; content stops where the calls block starts (calls are sent once parsed)."""

    def __init__(self, fmt: ChatFormat, thinking: bool, with_tools: bool):
        self.fmt, self.thinking, self.with_tools = fmt, thinking, with_tools

    @staticmethod
    def _hold(text: str, marker: str) -> str:
        """`text` without a tail that could grow into `marker`."""
        for n in range(min(len(marker) - 1, len(text)), 0, -1):
            if marker.startswith(text[-n:]):
                return text[:-n]
        return text

    def visible(self, text: str, final: bool) -> tuple[str, str]:
        if not final:
            text = text.rstrip("\ufffd")  # a character whose bytes are not all decoded yet
        reasoning, content = "", text
        if self.thinking:
            reasoning, content = split_reasoning(text)
            if content is None:
                if not final:
                    reasoning = "" if THINK_START.startswith(text) else self._hold(reasoning, THINK_END)
                return reasoning, ""
        if self.with_tools:
            k = calls_start(self.fmt, content)
            if k >= 0:
                return reasoning, content[:k]
            if not final:
                marker = ("\n\n" if self.fmt.tool_format in DSML_BLOCKS else "") + self.fmt.calls_marker
                content = self._hold(content, marker)
        return reasoning, content
