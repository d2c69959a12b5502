"""Chat formats of the DeepSeek families: which prompt format and tool-call format a checkpoint uses.

A model directory's own template always wins (tokenizer_config.json `chat_template` or
chat_template.jinja, rendered in the Jinja sandbox): V3, R1, V3.1, V3.1-Terminus and V3.2-Exp ship
one. V3.2 and V4 ship none -- their hub repos carry a Python encoder instead -- so for `model_type`
deepseek_v32 / deepseek_v4 without a template dsv3 uses its own encoders (`dsv32`, `dsv4`); anything
else without a template gets DeepSeek-V3's. `ChatFormat` records what the server must know: the
tool-call format the model writes, whether the prompt has a thinking switch, and whether tools are
rendered by the template/encoder or must be described in a system message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

V3, V31, DSML_V32, DSML_V4 = "deepseek_v3", "deepseek_v31", "dsml_function_calls", "dsml_tool_calls"
ENCODERS = {"deepseek_v32": DSML_V32, "deepseek_v4": DSML_V4}  # model_type -> tool format of the Python encoder


@dataclass(frozen=True)
class ChatFormat:
    """What a checkpoint's chat format means for requests and replies."""

    name: str            # "template" (the model's own Jinja), "deepseek_v3" (bundled V3 template), "deepseek_v32", "deepseek_v4"
    tool_format: str     # V3, V31, DSML_V32 or DSML_V4
    thinking: bool       # the prompt can open a <think> block (`thinking` / `enable_thinking` switch)
    renders_tools: bool  # the template/encoder writes the tool list itself from `tools=`
    reasoning_effort: bool = False  # V4's "max" effort prefix

    @property
    def calls_marker(self) -> str:
        """The text that opens a block of calls in model output."""
        from dsv3.io.encodings.dsml import DSML
        return {DSML_V32: f"<{DSML}function_calls>", DSML_V4: f"<{DSML}tool_calls>"}.get(
            self.tool_format, "<｜tool▁calls▁begin｜>")


def split_reasoning(text: str) -> tuple[str, str | None]:
    """(reasoning, content) of a thinking-mode reply, as vLLM's deepseek_r1 parser reads it: the prompt ended in
    `<think>`, so text before `</think>` is reasoning (a leading `<think>` dropped); no `</think>` yet: all reasoning."""
    if text.startswith("<think>"):
        text = text[len("<think>"):]
    k = text.find("</think>")
    if k < 0:
        return text, None
    return text[:k], text[k + len("</think>"):]


def template_format(source: str) -> ChatFormat:
    """The format a Jinja template writes, read from its text: V3.1-style calls put the name right after
    `<｜tool▁call▁begin｜>` and the raw arguments after `<｜tool▁sep｜>`; V3 writes `type<｜tool▁sep｜>name` and
    a ```json fence. A template that reads a `thinking` / `enable_thinking` variable has a thinking switch."""
    compact = source.replace(" ", "")
    v31 = "'<｜tool▁sep｜>'+tool['function']['arguments']" in compact or \
          "<｜tool▁sep｜>'+tool.function.arguments" in compact
    thinking = any(k in compact for k in ("thinkingisdefined", "ifthinking", "ifnotthinking", "enable_thinking"))
    tools = any(k in compact for k in ("toolsisdefined", "fortoolintools", "iftools"))
    return ChatFormat("template", V31 if v31 else V3, thinking, tools)


def chat_format(chat_template: Any, model_type: str | None) -> ChatFormat:
    """The ChatFormat of a tokenizer whose `chat_template` (tokenizer_config.json's value) and `model_type` are given."""
    from dsv3.io.chat_template import select_template

    source = select_template(chat_template)
    if source is not None:
        return template_format(source)
    if model_type in ENCODERS:
        return ChatFormat(model_type, ENCODERS[model_type], True, True, reasoning_effort=model_type == "deepseek_v4")
    return ChatFormat(V3, V3, False, False)


def encode(model_type: str, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
           thinking: bool = False, reasoning_effort: str | None = None, drop_thinking: bool = True) -> str:
    """The prompt of `messages` in V3.2's or V4's format (BOS included), tools attached to the system message."""
    from dsv3.io.encodings import dsv4, dsv32

    if model_type == "deepseek_v32":
        if reasoning_effort is not None:
            from dsv3.io.encodings.dsml import DSMLError
            raise DSMLError("DeepSeek-V3.2's format has no reasoning effort levels")
        return dsv32.encode_messages(dsv32.attach_tools(messages, tools), thinking, drop_earlier_reasoning=drop_thinking)
    return dsv4.encode_messages(dsv4.attach_tools(messages, tools), thinking, drop_earlier_reasoning=drop_thinking,
                                reasoning_effort=reasoning_effort if thinking else None)
