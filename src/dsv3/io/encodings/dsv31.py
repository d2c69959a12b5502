"""DeepSeek-V3.1 (and V3.1-Terminus): the chat template the hub ships, and the tool list its model card describes.

V3.1 is one model with two modes: the generation prompt ends in `<｜Assistant｜></think>` (non-thinking,
the default) or `<｜Assistant｜><think>` (thinking, the template variable `thinking`). Its template renders
past tool calls as `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>` (ARGS is raw JSON, no
```json fence, unlike V3) but no tool list: the model card puts `{system prompt}\\n\\n{tool_description}`
in the system area, which `tools_description` writes.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

# `chat_template` of deepseek-ai/DeepSeek-V3.1's tokenizer_config.json (V3.1-Terminus ships the same text),
# verbatim: the `'\n\n'` joining system prompts is a real blank line inside the Jinja string literal, and the two
# spaces after `{{'<think>'}}` are the hub's.
DEEPSEEK_V31_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% if not thinking is defined %}{% set thinking = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, system_prompt='', is_first_sp=true, is_last_user=false) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}{%- else %}"
    "{% set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %}{%- endif %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{%- set ns.is_tool = false -%}{%- set ns.is_first = false -%}{%- set ns.is_last_user = true -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] is not none %}"
    "{%- if ns.is_last_user %}{{'<｜Assistant｜></think>'}}{%- endif %}{%- set ns.is_last_user = false -%}"
    "{%- set ns.is_first = false %}{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls'] %}"
    "{%- if not ns.is_first %}{%- if message['content'] is none %}"
    "{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>'+ tool['function']['name'] + '<｜tool▁sep｜>' + tool['function']['arguments'] + '<｜tool▁call▁end｜>'}}"
    "{%- else %}"
    "{{message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['function']['name'] + '<｜tool▁sep｜>' + tool['function']['arguments'] + '<｜tool▁call▁end｜>'}}"
    "{%- endif %}{%- set ns.is_first = true -%}{%- else %}"
    "{{'<｜tool▁call▁begin｜>'+ tool['function']['name'] + '<｜tool▁sep｜>' + tool['function']['arguments'] + '<｜tool▁call▁end｜>'}}"
    "{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and (message['tool_calls'] is not defined or message['tool_calls'] is none) %}"
    "{%- if ns.is_last_user %}{{'<｜Assistant｜>'}}"
    "{%- if message['prefix'] is defined and message['prefix'] and thinking %}{{'<think>'}}  {%- else %}{{'</think>'}}"
    "{%- endif %}{%- endif %}{%- set ns.is_last_user = false -%}{%- if ns.is_tool %}"
    "{{message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}"
    "{%- set content = message['content'] -%}{%- if '</think>' in content %}"
    "{%- set content = content.split('</think>', 1)[1] -%}{%- endif %}{{content + '<｜end▁of▁sentence｜>'}}"
    "{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_last_user = false -%}"
    "{%- set ns.is_tool = true -%}{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- endif %}{%- endfor -%}{%- if add_generation_prompt and ns.is_last_user and not ns.is_tool %}"
    "{{'<｜Assistant｜>'}}{%- if not thinking %}{{'</think>'}}{%- else %}{{'<think>'}}{%- endif %}{% endif %}"
)

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"

# The model card's `{tool_description}`, after the per-tool sections.
_FORMAT_RULES = (
    "IMPORTANT: ALWAYS adhere to this exact format for tool use:\n"
    f"{CALLS_BEGIN}{CALL_BEGIN}tool_call_name{SEP}tool_call_arguments{CALL_END}{{additional_tool_calls}}{CALLS_END}\n\n"
    "Where:\n"
    "- `tool_call_name` must be an exact match to one of the available tools\n"
    "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema\n"
    "- For multiple tool calls, chain them directly without separators or spaces"
)


def tools_description(tools: Sequence[Mapping[str, Any]]) -> str:
    """The model card's `## Tools` block for OpenAI-style `tools` (each `{"type": "function", "function": {...}}`):
    one `### name` section per tool with its description and `json.dumps(parameters)`, then the format rules."""
    parts = ["## Tools\nYou have access to the following tools:\n\n"]
    for t in tools:
        f = t.get("function", t)
        parts.append(f"### {f['name']}\nDescription: {f.get('description') or ''}\n\n"
                     f"Parameters: {json.dumps(f.get('parameters') or {}, ensure_ascii=False)}\n\n")
    return "".join(parts) + _FORMAT_RULES


def with_tools(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with the tool description placed as the model card lays it out: `{system prompt}\\n\\n{tools}`
    (the template joins system messages with a blank line; with no system prompt the block still opens with one)."""
    out = [dict(m) for m in messages]
    text = tools_description(tools)
    last_sys = max((i for i, m in enumerate(out) if m.get("role") == "system"), default=None)
    if last_sys is None:
        out.insert(0, {"role": "system", "content": "\n\n" + text})
    else:
        out.insert(last_sys + 1, {"role": "system", "content": text})
    return out
