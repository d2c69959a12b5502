"""DeepSeek-V3.2's prompt format: V3.2 ships no Jinja template but a Python encoder
(`encoding/encoding_dsv32.py` in the hub repo deepseek-ai/DeepSeek-V3.2); this is dsv3's own
implementation of the same rules, checked against the repo's golden prompt (tests/test_chat_formats.py).

- Every user turn ends `<｜User｜>TEXT<｜Assistant｜>` plus `<think>` (thinking mode, last user turn only)
  or `</think>`; assistant turns are `REASONING</think>`-prefixed only after the last user turn.
- Thinking mode drops the reasoning of assistant turns before the last user message.
- Tools render into the first system message (`## Tools` + JSON schemas); calls are DSML
  `function_calls` blocks; tool results are `<function_results><result>...</result></function_results>`,
  followed by `<think>` / `</think>` when the last result of a call batch is written.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from dsv3.io.encodings.dsml import BOS, DSML, EOS, THINK_END, THINK_START, DSMLError, encode_calls, to_json

BLOCK = "function_calls"

TOOLS_SYSTEM_TEMPLATE = """## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<{dsml}function_calls>" block like the following as part of your reply to the user:
<{dsml}function_calls>
<{dsml}invoke name="$FUNCTION_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$FUNCTION_NAME2">
...
</{dsml}invoke>
</{dsml}function_calls>

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:

<{dsml}function_calls>
...
</{dsml}function_calls>

<function_results>
...
</function_results>

{think_start}...thinking about results{think_end}

Here are the functions available in JSONSchema format:
<functions>
{schemas}
</functions>
"""

RESPONSE_FORMAT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"


def render_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    schemas = "\n".join(to_json(t.get("function", t)) for t in tools)
    return TOOLS_SYSTEM_TEMPLATE.format(dsml=DSML, think_start=THINK_START, think_end=THINK_END, schemas=schemas)


def _last_user(messages: Sequence[Mapping[str, Any]]) -> int:
    return max((i for i, m in enumerate(messages) if m.get("role") in ("user", "developer")), default=-1)


def _reasoning(m: Mapping[str, Any]) -> str | None:
    return m.get("reasoning_content") or m.get("reasoning")


def _render(i: int, messages: Sequence[Mapping[str, Any]], thinking: bool) -> str:
    m, last = messages[i], _last_user(messages)
    role, content = m.get("role"), m.get("content")
    tools, fmt = m.get("tools"), m.get("response_format")
    extra = ("\n\n" + render_tools(tools) if tools else "") + \
            ("\n\n" + RESPONSE_FORMAT.format(schema=to_json(fmt)) if fmt else "")
    think_open = THINK_START if thinking and i == last else THINK_END
    if role == "system":
        return (content or "") + extra
    if role == "developer":
        if not content:
            raise DSMLError(f"message {i}: a developer message needs content")
        return f"<｜User｜>{extra}\n\n# The user's message is: {content}<｜Assistant｜>{think_open}"
    if role == "user":
        return f"<｜User｜>{content}<｜Assistant｜>{think_open}"
    if role == "tool":
        k = i - 1
        while k >= 0 and messages[k].get("role") == "tool":
            k -= 1
        calls = messages[k].get("tool_calls") if k >= 0 and messages[k].get("role") == "assistant" else None
        order = i - k
        if not calls or len(calls) < order:
            raise DSMLError(f"message {i}: a tool result with no matching tool call before it")
        out = ("\n\n<function_results>" if order == 1 else "") + f"\n<result>{content}</result>"
        if order == len(calls):
            out += "\n</function_results>\n\n" + (THINK_START if thinking and i >= last else THINK_END)
        return out
    if role == "assistant":
        calls = m.get("tool_calls")
        reasoning = ""
        if thinking and i > last:
            if not (_reasoning(m) or calls):
                raise DSMLError(f"message {i}: in thinking mode an assistant turn after the last user message "
                                "needs reasoning_content or tool_calls")
            reasoning = (_reasoning(m) or "") + THINK_END
        tc = "\n\n" + encode_calls(calls, BLOCK) if calls else ""
        return f"{reasoning}{content or ''}{tc}{EOS}"
    raise DSMLError(f"message {i}: unknown role {role!r}")


def drop_thinking(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Before the last user message, assistant turns lose their reasoning and developer turns are dropped
    (the hub code's `drop_thinking_messages`)."""
    last, out = _last_user(messages), []
    for i, m in enumerate(messages):
        m = dict(m)
        if i < last and m.get("role") not in ("user", "system", "tool"):
            if m.get("role") != "assistant":
                continue
            m.pop("reasoning_content", None)
            m.pop("reasoning", None)
        out.append(m)
    return out


def encode_messages(messages: Sequence[Mapping[str, Any]], thinking: bool, context: Sequence[Mapping[str, Any]] = (),
                    drop_earlier_reasoning: bool = True, add_bos: bool = True) -> str:
    """The prompt text of `messages` (after the already-encoded `context`), BOS first when there is no context."""
    full = list(context) + list(messages)
    if thinking and drop_earlier_reasoning:
        full = drop_thinking(full)
    prompt = BOS if add_bos and not context else ""
    return prompt + "".join(_render(i, full, thinking) for i in range(len(context), len(full)))


def attach_tools(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Request-level `tools` go on the first system message (one is added at the front when there is none)."""
    out = [dict(m) for m in messages]
    if tools:
        if out and out[0].get("role") == "system":
            out[0]["tools"] = list(tools)
        else:
            out.insert(0, {"role": "system", "content": "", "tools": list(tools)})
    return out
