"""Chat formats per family (issue 19): DeepSeek-V3.1's shipped template, V3.2's and V4's encoders, their tool-call
formats. Expected prompts are the official ones: the hub repos' golden encoder outputs (tests/data/chat_formats,
see SOURCES.md), strings printed from the official V3.1 template by llama.cpp, and the V3.1 model card's layouts."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from dsv3.io.chat_template import DEEPSEEK_V3_CHAT_TEMPLATE, ChatTemplateError
from dsv3.io.encodings import DSML_V32, DSML_V4, V3, V31, chat_format, dsv4, dsv32, encode, template_format
from dsv3.io.encodings.dsml import DSMLError, encode_calls, parse_completion
from dsv3.io.encodings.dsv31 import DEEPSEEK_V31_CHAT_TEMPLATE, tools_description, with_tools
from dsv3.io.tokenizer import Tokenizer
from dsv3.serve import tool_formats

DATA = Path(__file__).parent / "data" / "chat_formats"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def _tok(tmp_path, model_type=None, template=None) -> Tokenizer:
    from tiny_tokenizer import make_tiny_tokenizer

    d = make_tiny_tokenizer(tmp_path / "tok")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    if template is not None:
        cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    if model_type is not None:
        (d / "config.json").write_text(json.dumps({"model_type": model_type}))
    return Tokenizer.from_dir(d)


def _render31(messages, **kw):
    from dsv3.io.chat_template import render_chat_template
    return render_chat_template(DEEPSEEK_V31_CHAT_TEMPLATE, messages, bos_token=kw.pop("bos_token", BOS), **kw)


# -- DeepSeek-V3.2 -----------------------------------------------------------------------------------------------

def _dsv32_case():
    case = json.loads((DATA / "dsv32_test_input.json").read_text(encoding="utf-8"))
    messages = case["messages"]
    messages[0]["tools"] = case["tools"]  # as the hub's test_encoding_dsv32.py does
    return messages, (DATA / "dsv32_test_output.txt").read_text(encoding="utf-8").strip()


def test_dsv32_matches_the_official_golden_prompt():
    messages, gold = _dsv32_case()
    assert dsv32.encode_messages(messages, thinking=True) == gold
    # the same through the request-level API: tools passed separately land on the system message
    case = json.loads((DATA / "dsv32_test_input.json").read_text(encoding="utf-8"))
    assert encode("deepseek_v32", case["messages"], tools=case["tools"], thinking=True) == gold


def test_dsv32_drops_earlier_reasoning_only_in_thinking_mode():
    messages, gold = _dsv32_case()
    assert "User is asking about tomorrow's weather" not in gold  # before the last user turn: dropped
    assert "User is now asking about the day after tomorrow" in gold
    # as in the hub code, V3.2 writes reasoning only after the last user turn whether or not it is dropped first
    assert dsv32.encode_messages(messages, thinking=True, drop_earlier_reasoning=False) == gold
    chat = dsv32.encode_messages(messages, thinking=False)
    assert "<think>" not in chat.split("</functions>")[1]  # no turn opens a thinking block in chat mode
    assert chat.count("<｜Assistant｜></think>") == 2


def test_dsv32_official_round_trips():
    """The hub test's checks: an assistant turn encoded after its context parses back to itself (ids aside)."""
    messages, _ = _dsv32_case()
    call_msg = messages[4]
    text = dsv32.encode_messages([call_msg], thinking=True, context=messages[:4])
    parsed = parse_completion(text, thinking=True, block="function_calls")
    parsed.pop("content")
    want = copy.deepcopy(call_msg)
    for c in want["tool_calls"]:
        c.pop("id")
    assert parsed == want
    think_msg = messages[-6]
    text = dsv32.encode_messages([think_msg], thinking=True, context=messages[:-6])
    parsed = parse_completion(text, thinking=True, block="function_calls")
    assert parsed.pop("tool_calls") == []
    assert parsed == think_msg


def test_dsv32_generation_prompt_and_tool_results():
    assert encode("deepseek_v32", [{"role": "user", "content": "Hello"}]) == f"{BOS}<｜User｜>Hello<｜Assistant｜></think>"
    assert encode("deepseek_v32", [{"role": "user", "content": "Hello"}], thinking=True).endswith("<｜Assistant｜><think>")
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                  "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "Sunny"}]
    text = encode("deepseek_v32", msgs, thinking=True)
    assert text.endswith("<｜User｜>Weather in Paris?<｜Assistant｜><think></think>\n\n<｜DSML｜function_calls>\n"
                         '<｜DSML｜invoke name="get_weather">\n<｜DSML｜parameter name="city" string="true">Paris'
                         "</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜function_calls><｜end▁of▁sentence｜>\n\n"
                         "<function_results>\n<result>Sunny</result>\n</function_results>\n\n<think>")
    with pytest.raises(DSMLError, match="no matching tool call"):
        encode("deepseek_v32", [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])


# -- DeepSeek-V4 --------------------------------------------------------------------------------------------------

def test_dsv4_matches_the_official_golden_prompts():
    case = json.loads((DATA / "dsv4_test_input_1.json").read_text(encoding="utf-8"))
    gold = (DATA / "dsv4_test_output_1.txt").read_text(encoding="utf-8")
    assert encode("deepseek_v4", case["messages"], tools=case["tools"], thinking=True) == gold
    # encoding/tests/test_output_2.txt: earlier reasoning dropped, no tools
    sys_ = {"role": "system", "content": "You are a helpful assistant."}
    msgs = [sys_, {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi there! How can I help you?", "reasoning": "The user said hello, I should greet back."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris.",
             "reasoning": "The user asks about the capital of France. It is Paris."}]
    assert dsv4.encode_messages(msgs, thinking=True) == (
        f"{BOS}You are a helpful assistant.<｜User｜>Hello<｜Assistant｜></think>Hi there! How can I help you?{EOS}"
        "<｜User｜>What is the capital of France?<｜Assistant｜><think>The user asks about the capital of France. "
        f"It is Paris.</think>The capital of France is Paris.{EOS}")


def test_dsv4_modes_and_reasoning_effort():
    sys_ = {"role": "system", "content": "You are a helpful assistant."}
    hello = [sys_, {"role": "user", "content": "Hello"}]
    assert encode("deepseek_v4", hello) == f"{BOS}You are a helpful assistant.<｜User｜>Hello<｜Assistant｜></think>"
    assert encode("deepseek_v4", hello, thinking=True).endswith("Hello<｜Assistant｜><think>")
    assert encode("deepseek_v4", hello, thinking=True, reasoning_effort="max").startswith(
        BOS + "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n")
    assert encode("deepseek_v4", hello, thinking=True, reasoning_effort="high") == encode("deepseek_v4", hello, thinking=True)
    assert encode("deepseek_v4", hello, reasoning_effort="max") == encode("deepseek_v4", hello)  # chat mode: no prefix
    two = [sys_, {"role": "user", "content": "One"}, {"role": "user", "content": "Two"}]
    assert encode("deepseek_v4", two) == f"{BOS}You are a helpful assistant.<｜User｜>One\n\nTwo<｜Assistant｜></think>"
    with pytest.raises(DSMLError, match="reasoning_effort"):
        dsv4.encode_messages(hello, thinking=True, reasoning_effort="extreme")


# -- DeepSeek-V3.1 ------------------------------------------------------------------------------------------------

def test_v31_template_matches_llama_cpp_example():
    """llama.cpp prints this example from the template embedded in DeepSeek-V3.1-Terminus (bos_token empty)."""
    msgs = [{"role": "system", "content": "You are a helpful assistant"}, {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi there"}, {"role": "user", "content": "How are you?"}]
    assert _render31(msgs, bos_token="", add_generation_prompt=True, thinking=True) == (
        "You are a helpful assistant<｜User｜>Hello<｜Assistant｜></think>Hi there<｜end▁of▁sentence｜><｜User｜>How are you?"
        "<｜Assistant｜><think>")


def test_v31_template_matches_the_model_card_layouts():
    sys_, q = {"role": "system", "content": "SYS"}, {"role": "user", "content": "Q1"}
    assert _render31([sys_, q], add_generation_prompt=True) == f"{BOS}SYS<｜User｜>Q1<｜Assistant｜></think>"
    assert _render31([sys_, q], add_generation_prompt=True, thinking=True) == f"{BOS}SYS<｜User｜>Q1<｜Assistant｜><think>"
    multi = [sys_, q, {"role": "assistant", "content": "<think>reasoning</think>A1"}, {"role": "user", "content": "Q2"}]
    # earlier reasoning is dropped: the template keeps only what follows </think>
    assert _render31(multi, add_generation_prompt=True, thinking=True) == (
        f"{BOS}SYS<｜User｜>Q1<｜Assistant｜></think>A1{EOS}<｜User｜>Q2<｜Assistant｜><think>")


TEMP = {"type": "function", "function": {"name": "convert_temperature", "description": "Convert temperature from one unit to another",
        "parameters": {"type": "object", "properties": {
            "temperature": {"type": "number", "description": "The temperature value"},
            "from_unit": {"type": "string", "description": "The unit to convert from"},
            "to_unit": {"type": "string", "description": "The unit to convert to"}},
            "required": ["temperature", "from_unit", "to_unit"]}}}
DATE = {"type": "function", "function": {"name": "get_current_date", "description": "Get the current date", "parameters": {}}}


def test_v31_tool_prompt_and_calls_match_the_official_template():
    """ms-swift's expected prompt for DeepSeek-V3.1 tool use (its test renders the hub template: same tail)."""
    args = '{"temperature": 30, "from_unit": "Celsius", "to_unit": "Fahrenheit"}'
    call = {"type": "function", "function": {"name": "convert_temperature", "arguments": args}}
    msgs = [{"role": "user", "content": "Hi, I need to convert a temperature from Celsius to Fahrenheit. The temperature is 30 degrees Celsius."},
            {"role": "assistant", "content": None, "tool_calls": [call, call]},
            {"role": "tool", "content": '{"converted_temperature": 86}'},
            {"role": "tool", "content": '{"converted_temperature": 86}'},
            {"role": "assistant", "content": "The converted temperature from 30 degrees Celsius to Fahrenheit is 86 degrees Fahrenheit."}]
    expected = (
        f"{BOS}\n\n## Tools\nYou have access to the following tools:\n\n### convert_temperature\n"
        "Description: Convert temperature from one unit to another\n\n"
        'Parameters: {"type": "object", "properties": {"temperature": {"type": "number", "description": "The temperature value"}, '
        '"from_unit": {"type": "string", "description": "The unit to convert from"}, "to_unit": {"type": "string", '
        '"description": "The unit to convert to"}}, "required": ["temperature", "from_unit", "to_unit"]}\n\n'
        "### get_current_date\nDescription: Get the current date\n\nParameters: {}\n\n"
        "IMPORTANT: ALWAYS adhere to this exact format for tool use:\n"
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>tool_call_name<｜tool▁sep｜>tool_call_arguments<｜tool▁call▁end｜>"
        "{additional_tool_calls}<｜tool▁calls▁end｜>\n\nWhere:\n"
        "- `tool_call_name` must be an exact match to one of the available tools\n"
        "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema\n"
        "- For multiple tool calls, chain them directly without separators or spaces<｜User｜>"
        "Hi, I need to convert a temperature from Celsius to Fahrenheit. The temperature is 30 degrees Celsius."
        f"<｜Assistant｜></think><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>convert_temperature<｜tool▁sep｜>{args}<｜tool▁call▁end｜>"
        f"<｜tool▁call▁begin｜>convert_temperature<｜tool▁sep｜>{args}<｜tool▁call▁end｜><｜tool▁calls▁end｜>{EOS}"
        '<｜tool▁output▁begin｜>{"converted_temperature": 86}<｜tool▁output▁end｜>'
        '<｜tool▁output▁begin｜>{"converted_temperature": 86}<｜tool▁output▁end｜>'
        f"The converted temperature from 30 degrees Celsius to Fahrenheit is 86 degrees Fahrenheit.{EOS}")
    assert _render31(with_tools(msgs, [TEMP, DATE])) == expected
    # with a system prompt the model card's layout is `{system prompt}\n\n{tool_description}`
    text = _render31(with_tools([{"role": "system", "content": "SYS"}, msgs[0]], [DATE]), add_generation_prompt=True)
    assert text == f"{BOS}SYS\n\n{tools_description([DATE])}<｜User｜>{msgs[0]['content']}<｜Assistant｜></think>"


# -- format detection and the tokenizer ----------------------------------------------------------------------------

def test_format_detection():
    assert template_format(DEEPSEEK_V3_CHAT_TEMPLATE).tool_format == V3
    assert not template_format(DEEPSEEK_V3_CHAT_TEMPLATE).thinking
    f31 = template_format(DEEPSEEK_V31_CHAT_TEMPLATE)
    assert (f31.tool_format, f31.thinking, f31.renders_tools) == (V31, True, False)
    assert chat_format(None, "deepseek_v32").tool_format == DSML_V32
    assert chat_format(None, "deepseek_v4").tool_format == DSML_V4 and chat_format(None, "deepseek_v4").reasoning_effort
    assert chat_format(None, "deepseek_v3").tool_format == V3
    assert chat_format(DEEPSEEK_V31_CHAT_TEMPLATE, "deepseek_v32").tool_format == V31  # the dir's own template wins


def test_tokenizer_picks_the_encoder_only_without_a_template(tmp_path):
    msgs = [{"role": "user", "content": "Hello"}]
    tok = _tok(tmp_path / "a", model_type="deepseek_v32")
    assert tok.apply_chat_template(msgs, thinking=True) == encode("deepseek_v32", msgs, thinking=True)
    assert tok.apply_chat_template(msgs, enable_thinking=True).endswith("<think>")
    with pytest.raises(ChatTemplateError, match="deepseek_v32"):
        tok.apply_chat_template([{"role": "developer", "content": ""}])
    own = _tok(tmp_path / "b", model_type="deepseek_v32", template=DEEPSEEK_V31_CHAT_TEMPLATE)
    assert own.apply_chat_template(msgs, thinking=True) == f"{BOS}<｜User｜>Hello<｜Assistant｜><think>"
    assert own.apply_chat_template(msgs, enable_thinking=True) == f"{BOS}<｜User｜>Hello<｜Assistant｜><think>"
    assert own.apply_chat_template(msgs) == f"{BOS}<｜User｜>Hello<｜Assistant｜></think>"
    plain = _tok(tmp_path / "c", model_type="deepseek_v3")
    assert plain.apply_chat_template(msgs) == f"{BOS}<｜User｜>Hello<｜Assistant｜>"


# -- parsers ---------------------------------------------------------------------------------------------------------

ARGS = {"city": 'Paris "Left Bank"\n<b>', "days": 3, "metric": True, "ratio": 0.5, "tags": ["a", "b"],
        "where": {"lat": 48.85, "lon": None}}


@pytest.mark.parametrize("fmt_name,block", [(DSML_V32, "function_calls"), (DSML_V4, "tool_calls")])
def test_dsml_parser_round_trips_typed_arguments(fmt_name, block):
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": json.dumps(ARGS)}},
             {"type": "function", "function": {"name": "noop", "arguments": "{}"}}]
    text = "Let me check.\n\n" + encode_calls(calls, block)
    fmt = chat_format(None, "deepseek_v32" if fmt_name == DSML_V32 else "deepseek_v4")
    content, parsed = tool_formats.parse_calls(fmt, text)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in parsed] == ["get_weather", "noop"]
    assert json.loads(parsed[0]["function"]["arguments"]) == ARGS
    assert json.loads(parsed[1]["function"]["arguments"]) == {}
    # malformed DSML stays content; a string="false" value that is not JSON is malformed
    bad = text.replace('string="false">3<', 'string="false">three<')
    assert tool_formats.parse_calls(fmt, bad) == (bad, [])


def test_v31_parser_round_trips_what_the_template_writes():
    args = json.dumps(ARGS)
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": args}},
                {"type": "function", "function": {"name": "noop", "arguments": "{}"}}]}]
    rendered = _render31(msgs)
    reply = rendered.split("<｜Assistant｜></think>", 1)[1].removesuffix(EOS)
    content, calls = tool_formats.parse_calls(template_format(DEEPSEEK_V31_CHAT_TEMPLATE), reply)
    assert content == "Checking."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("get_weather", ARGS), ("noop", {})]


def test_reasoning_split_and_stream_holdback():
    assert tool_formats.split_reasoning("plan</think>answer") == ("plan", "answer")
    assert tool_formats.split_reasoning("<think>plan</think>") == ("plan", "")
    assert tool_formats.split_reasoning("still thinking") == ("still thinking", None)
    fmt = chat_format(None, "deepseek_v32")
    sp = tool_formats.StreamSplitter(fmt, thinking=True, with_tools=True)
    full = 'plan</think>Hi.\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n</｜DSML｜invoke>\n</｜DSML｜function_calls>'
    seen = [sp.visible(full[:k], final=False) for k in range(len(full) + 1)]
    for (r0, c0), (r1, c1) in zip(seen, seen[1:]):  # what is shown only ever grows
        assert r1.startswith(r0) and c1.startswith(c0)
    assert all("</" not in r and "<" not in c for r, c in seen)
    assert sp.visible(full, final=True) == ("plan", "Hi.")


def test_thinking_switch_is_checked_against_the_format():
    from types import SimpleNamespace

    from dsv3.serve.errors import APIError

    def kw(fmt, ctk=None, effort=None):
        return tool_formats.template_kwargs(fmt, SimpleNamespace(chat_template_kwargs=ctk, reasoning_effort=effort))

    v3, v31, v4 = tool_formats.V3_FORMAT, template_format(DEEPSEEK_V31_CHAT_TEMPLATE), chat_format(None, "deepseek_v4")
    assert kw(v3) == ({}, False)
    for bad in ({"ctk": {"thinking": True}}, {"effort": "high"}):
        with pytest.raises(APIError, match="no thinking mode"):
            kw(v3, **bad)
    assert kw(v31, {"thinking": True}) == ({"thinking": True}, True)
    assert kw(v31, {"enable_thinking": True}) == ({"thinking": True}, True)
    assert kw(v31, effort="none") == ({"thinking": False}, False)
    assert kw(v4, effort="max") == ({"thinking": True, "reasoning_effort": "max"}, True)
    assert kw(v4, effort="low") == ({"thinking": True, "reasoning_effort": None}, True)
    with pytest.raises(APIError, match="contradicts"):
        kw(v31, {"thinking": False}, effort="high")
    with pytest.raises(APIError, match="boolean"):
        kw(v31, {"thinking": "yes"})
