"""DeepSeek-V4's prompt format, after the Python encoder the hub repo deepseek-ai/DeepSeek-V4-Flash ships
(`encoding/encoding_dsv4.py`); dsv3's own implementation, checked against that repo's golden prompts.

Differences from V3.2: tool results are not a role of their own but `<tool_result>...</tool_result>`
blocks merged into a user turn (results sorted into the order of the calls); every user turn (not only
the last) is followed by `<｜Assistant｜>` + `<think>`/`</think>`; the DSML block is `tool_calls`;
reasoning is dropped before the last user message only when no message carries tools; developer turns
carry tools of their own; `latest_reminder` turns have their own marker; reasoning effort "max" prefixes
the conversation in thinking mode.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

from dsv3.io.encodings.dsml import BOS, DSML, EOS, THINK_END, THINK_START, DSMLError, encode_calls, to_json

BLOCK = "tool_calls"
USER, ASSISTANT, REMINDER = "<｜User｜>", "<｜Assistant｜>", "<｜latest_reminder｜>"
REASONING_EFFORTS = (None, "high", "max")

REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, "
    "rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

TOOLS_TEMPLATE = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<{dsml}tool_calls>" block like the following:

<{dsml}tool_calls>
<{dsml}invoke name="$TOOL_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$TOOL_NAME2">
...
</{dsml}invoke>
</{dsml}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {think_start}), you MUST output your complete reasoning inside {think_start}...{think_end} BEFORE any tool calls or final response.

Otherwise, output directly after {think_end} with tool calls or final response.

### Available Tool Schemas

{schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

RESPONSE_FORMAT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"


def render_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    schemas = "\n".join(to_json(t.get("function", t)) for t in tools)
    return TOOLS_TEMPLATE.format(dsml=DSML, think_start=THINK_START, think_end=THINK_END, schemas=schemas)


def _last_user(messages: Sequence[Mapping[str, Any]]) -> int:
    return max((i for i, m in enumerate(messages) if m.get("role") in ("user", "developer")), default=-1)


def _reasoning(m: Mapping[str, Any]) -> str:
    return m.get("reasoning") or m.get("reasoning_content") or ""


def _extras(m: Mapping[str, Any]) -> str:
    tools, fmt = m.get("tools"), m.get("response_format")
    return ("\n\n" + render_tools(tools) if tools else "") + \
           ("\n\n" + RESPONSE_FORMAT.format(schema=to_json(fmt)) if fmt else "")


def _user_text(m: Mapping[str, Any]) -> str:
    blocks = m.get("content_blocks")
    if not blocks:
        return m.get("content") or ""
    parts = []
    for b in blocks:
        if b.get("type") == "text":
            parts.append(b.get("text", ""))
        elif b.get("type") == "tool_result":
            c = b.get("content", "")
            if isinstance(c, list):
                c = "\n\n".join(x.get("text", "") if x.get("type") == "text" else f"[Unsupported {x.get('type')}]" for x in c)
            parts.append(f"<tool_result>{c}</tool_result>")
        else:
            parts.append(f"[Unsupported {b.get('type')}]")
    return "\n\n".join(parts)


def _render(i: int, messages: Sequence[Mapping[str, Any]], thinking: bool, drop: bool, effort: str | None) -> str:
    m, last = messages[i], _last_user(messages)
    role = m.get("role")
    out = REASONING_EFFORT_MAX if i == 0 and thinking and effort == "max" else ""
    if role == "system":
        out += (m.get("content") or "") + _extras(m)
    elif role == "developer":
        if not m.get("content"):
            raise DSMLError(f"message {i}: a developer message needs content")
        out += USER + m["content"] + _extras(m)
    elif role == "user":
        out += USER + _user_text(m)
    elif role == "latest_reminder":
        out += REMINDER + (m.get("content") or "")
    elif role == "assistant":
        calls = m.get("tool_calls")
        tc = "\n\n" + encode_calls(calls, BLOCK) if calls else ""
        after_task = i > 0 and messages[i - 1].get("task") is not None
        reasoning = _reasoning(m) + THINK_END if thinking and not after_task and (not drop or i > last) else ""
        out += reasoning + (m.get("content") or "") + tc + ("" if m.get("wo_eos") else EOS)
    else:
        raise DSMLError(f"message {i}: unknown role {role!r}")
    if i + 1 < len(messages) and messages[i + 1].get("role") not in ("assistant", "latest_reminder"):
        return out
    if m.get("task") is not None:
        raise DSMLError(f"message {i}: quick-instruction tasks are not supported")
    if role in ("user", "developer"):
        out += ASSISTANT + (THINK_START if thinking and (not drop or i >= last) else THINK_END)
    return out


def merge_tool_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`tool` messages become `tool_result` blocks of a user turn; a user message right after them joins that turn."""
    merged: list[dict[str, Any]] = []
    for m in messages:
        m = copy.deepcopy(dict(m))
        role = m.get("role")
        if role == "tool":
            block = {"type": "tool_result", "tool_use_id": m.get("tool_call_id", ""), "content": m.get("content", "")}
            if merged and merged[-1].get("role") == "user" and "content_blocks" in merged[-1]:
                merged[-1]["content_blocks"].append(block)
            else:
                merged.append({"role": "user", "content_blocks": [block]})
        elif role == "user":
            block = {"type": "text", "text": m.get("content", "")}
            if merged and merged[-1].get("role") == "user" and "content_blocks" in merged[-1] \
                    and merged[-1].get("task") is None:
                merged[-1]["content_blocks"].append(block)
            else:
                new = {"role": "user", "content": m.get("content", ""), "content_blocks": [block]}
                new.update({k: m[k] for k in ("task", "wo_eos", "mask") if k in m})
                merged.append(new)
        else:
            merged.append(m)
    return merged


def sort_tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool results in the order of the calls they answer (by call id), as the hub code does."""
    order: dict[str, int] = {}
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            order = {c.get("id"): k for k, c in enumerate(m["tool_calls"]) if c.get("id")}
        elif m.get("role") == "user" and m.get("content_blocks"):
            results = [b for b in m["content_blocks"] if b.get("type") == "tool_result"]
            if len(results) > 1 and order:
                ranked = iter(sorted(results, key=lambda b: order.get(b.get("tool_use_id", ""), 0)))
                m["content_blocks"] = [next(ranked) if b.get("type") == "tool_result" else b for b in m["content_blocks"]]
    return messages


def _drop_reasoning(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    last, out = _last_user(messages), []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role in ("user", "system", "tool", "latest_reminder", "direct_search_results") or i >= last:
            out.append(dict(m))
        elif role == "assistant":
            m = dict(m)
            m.pop("reasoning", None)
            m.pop("reasoning_content", None)
            out.append(m)
    return out


def encode_messages(messages: Sequence[Mapping[str, Any]], thinking: bool, context: Sequence[Mapping[str, Any]] = (),
                    drop_earlier_reasoning: bool = True, add_bos: bool = True, reasoning_effort: str | None = None) -> str:
    """The prompt text of `messages` after the already-encoded `context` (the hub's `encode_messages`)."""
    if reasoning_effort not in REASONING_EFFORTS:
        raise DSMLError(f"reasoning_effort must be one of {REASONING_EFFORTS}, got {reasoning_effort!r}")
    ctx = sort_tool_results(merge_tool_messages(context)) if context else []
    msgs = sort_tool_results(merge_tool_messages(list(context) + list(messages)))[len(ctx):] if context else \
        sort_tool_results(merge_tool_messages(messages))
    full = ctx + msgs
    drop = drop_earlier_reasoning and not any(m.get("tools") for m in full)
    prompt = BOS if add_bos and not ctx else ""
    if thinking and drop:
        full = _drop_reasoning(full)
        start = len(_drop_reasoning(ctx))
    else:
        start = len(ctx)
    return prompt + "".join(_render(i, full, thinking, drop, reasoning_effort) for i in range(start, len(full)))


def attach_tools(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Request-level `tools` go on the first system message (one is added at the front when there is none)."""
    out = [dict(m) for m in messages]
    if tools:
        if out and out[0].get("role") == "system":
            out[0]["tools"] = list(tools)
        else:
            out.insert(0, {"role": "system", "content": "", "tools": list(tools)})
    return out
