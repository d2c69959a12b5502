"""/v1/chat/completions in each family's own chat format (issue 19), through the openai SDK: reasoning_content
(whole and streamed), tool calls in V3.1's and V3.2's DSML format parsed into OpenAI tool_calls, the thinking
switch (chat_template_kwargs / reasoning_effort) and forced V3.1-format calls.

The tiny random model cannot write these formats by itself, so the engine here appends a logits processor that
forces a scripted reply (the text a real checkpoint would write); the prompt the server rendered is checked
against the same renderer the unit tests check against the official outputs."""

from __future__ import annotations

import json
import shutil

import openai
import pytest
import torch

from dsv3.engine import EngineConfig, LLMEngine
from dsv3.engine.outputs import EngineRequest
from dsv3.io.encodings import dsv31
from dsv3.io.load import load_model
from dsv3.io.tokenizer import Tokenizer
from serve_harness import serve
from tiny_model import make_tiny_model_dir

SCRIPT: dict[str, str | None] = {"reply": None}
PROMPTS: list[list[int]] = []
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city", "days"],
    "properties": {"city": {"type": "string", "maxLength": 20}, "days": {"type": "integer", "minimum": 1, "maximum": 9}}}}}


class ScriptedEngine(LLMEngine):
    """An engine whose next replies write SCRIPT["reply"] token by token, then EOS (unless the request has its own
    processors: a forced-call grammar must drive the output itself)."""

    def add_request(self, request_id, prompt, params=None, **kw):
        if isinstance(prompt, EngineRequest):
            PROMPTS.append(list(prompt.prompt_ids))
            if SCRIPT["reply"] is not None and not prompt.params.logits_processors:
                ids = self.tokenizer.encode(SCRIPT["reply"], add_special_tokens=False) + [self.tokenizer.eos_token_id]

                def force(out: list[int], logits: torch.Tensor) -> torch.Tensor:
                    only = torch.full_like(logits, float("-inf"))
                    only[ids[min(len(out), len(ids) - 1)]] = 0.0
                    return only
                prompt.params.logits_processors.append(force)
        return super().add_request(request_id, prompt, params, **kw)


def _loader(model_dir, model_type=None):
    def load():
        tok = Tokenizer.from_dir(model_dir)
        if model_type is not None:
            tok.model_type = model_type  # a V3.2 tokenizer on the tiny V3 weights: the encoder is what is tested
        cfg = EngineConfig(max_num_seqs=4, max_model_len=2048, kv_cache_memory=64 << 20)
        return ScriptedEngine(load_model(model_dir, dtype="fp32"), tok, cfg), tok
    return load


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"), max_position_embeddings=4096)


@pytest.fixture(scope="module")
def v31(base_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("v31") / "m"
    shutil.copytree(base_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = dsv31.DEEPSEEK_V31_CHAT_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with serve(d, loader=_loader(d)) as s:
        yield s


@pytest.fixture(scope="module")
def v32(base_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("v32") / "m"
    shutil.copytree(base_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with serve(d, loader=_loader(d, "deepseek_v32")) as s:
        yield s


def sdk(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)


def _last_prompt(srv) -> str:
    return srv.state.tokenizer.decode(PROMPTS[-1], skip_special_tokens=False)


def _stream(client, **kw):
    reasoning, content, calls, finish = "", "", {}, None
    for ch in client.chat.completions.create(stream=True, **kw):
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        reasoning += (d.model_extra or {}).get("reasoning_content") or ""
        content += d.content or ""
        for c in d.tool_calls or []:
            calls[c.index] = c
        finish = ch.choices[0].finish_reason or finish
    return reasoning, content, [calls[k] for k in sorted(calls)], finish


MSGS = [{"role": "user", "content": "What is 2+2?"}]


def test_v31_thinking_reply_splits_reasoning(v31):
    SCRIPT["reply"] = "Two plus two.</think>It is 4."
    c = sdk(v31)
    r = c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=200, extra_body={"chat_template_kwargs": {"thinking": True}})
    assert _last_prompt(v31).endswith("<｜User｜>What is 2+2?<｜Assistant｜><think>")
    msg = r.choices[0].message
    assert (msg.model_extra["reasoning_content"], msg.content) == ("Two plus two.", "It is 4.")
    assert _stream(c, model="tiny", messages=MSGS, max_tokens=200, reasoning_effort="high")[:2] == ("Two plus two.", "It is 4.")
    # thinking off (the default): the prompt closes the think block and the reply is all content
    SCRIPT["reply"] = "It is 4."
    r = c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=200)
    assert _last_prompt(v31).endswith("<｜Assistant｜></think>")
    assert r.choices[0].message.content == "It is 4." and "reasoning_content" not in (r.choices[0].message.model_extra or {})
    c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=200, reasoning_effort="none")
    assert _last_prompt(v31).endswith("<｜Assistant｜></think>")


def test_v31_tool_calls_in_its_own_format(v31):
    SCRIPT["reply"] = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Paris\", \"days\": 3}"
                       "<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
    c = sdk(v31)
    r = c.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER], max_tokens=300)
    prompt = _last_prompt(v31)
    assert dsv31.tools_description([WEATHER]) in prompt and "```json" not in prompt
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [(t.function.name, json.loads(t.function.arguments)) for t in choice.message.tool_calls] == \
        [("get_weather", {"city": "Paris", "days": 3})]
    _, content, calls, finish = _stream(c, model="tiny", messages=MSGS, tools=[WEATHER], max_tokens=300)
    assert (content, finish) == ("", "tool_calls")
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "days": 3}
    # the call and its result go back in as history, rendered by the template in V3.1's layout
    SCRIPT["reply"] = "Sunny."
    hist = MSGS + [{"role": "assistant", "content": None, "tool_calls": [choice.message.tool_calls[0].model_dump()]},
                   {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": "sunny"}]
    c.chat.completions.create(model="tiny", messages=hist, tools=[WEATHER], max_tokens=50)
    assert _last_prompt(v31).endswith('<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris", "days": 3}'
                                      "<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>"
                                      "<｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜>")


def test_v31_forced_calls_use_its_layout(v31):
    SCRIPT["reply"] = None  # the grammar alone writes the reply
    c = sdk(v31)
    r = c.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER], max_tokens=400, seed=3,
                                  tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                  extra_body={"return_token_ids": True})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    raw = v31.state.tokenizer.decode(choice.model_extra["token_ids"], skip_special_tokens=False)
    assert raw.startswith("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{")  # V3.1's layout, no fence
    assert raw.removesuffix("<｜end▁of▁sentence｜>").endswith("}<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
    args = json.loads(choice.message.tool_calls[0].function.arguments)
    assert set(args) == {"city", "days"} and 1 <= args["days"] <= 9
    with pytest.raises(openai.BadRequestError, match="thinking off"):
        c.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER], tool_choice="required",
                                  extra_body={"chat_template_kwargs": {"thinking": True}})


def test_v32_dsml_calls_and_reasoning(v32):
    SCRIPT["reply"] = ('I should call the tool.</think>\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="get_weather">\n'
                       '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
                       '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
                       "</｜DSML｜invoke>\n</｜DSML｜function_calls>")
    c = sdk(v32)
    kw = dict(model="tiny", messages=[{"role": "system", "content": "Be brief."}] + MSGS, tools=[WEATHER], max_tokens=400,
              extra_body={"chat_template_kwargs": {"thinking": True}})
    r = c.chat.completions.create(**kw)
    prompt = _last_prompt(v32)
    assert prompt.startswith("<｜begin▁of▁sentence｜>Be brief.\n\n## Tools\n") and '"name": "get_weather"' in prompt
    assert prompt.endswith("<｜User｜>What is 2+2?<｜Assistant｜><think>")
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert msg.model_extra["reasoning_content"] == "I should call the tool." and not msg.content
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris", "days": 3}  # typed: days is an int
    reasoning, content, calls, finish = _stream(c, **kw)
    assert (reasoning, content, finish) == ("I should call the tool.", "", "tool_calls")
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"city": "Paris", "days": 3}
    # earlier reasoning goes back as reasoning_content; the encoder drops it before the last user turn
    SCRIPT["reply"] = "Fine.</think>Done."
    hist = kw["messages"] + [{"role": "assistant", "content": "", "reasoning_content": "OLD REASONING",
                              "tool_calls": [msg.tool_calls[0].model_dump()]},
                             {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "sunny"}]
    r = c.chat.completions.create(**{**kw, "messages": hist})
    assert "OLD REASONING" in _last_prompt(v32)  # after the last user turn: kept
    assert _last_prompt(v32).endswith("<result>sunny</result>\n</function_results>\n\n<think>")
    assert (r.choices[0].message.model_extra["reasoning_content"], r.choices[0].message.content) == ("Fine.", "Done.")


def test_thinking_requests_are_checked_against_the_model(v32):
    c = sdk(v32)
    with pytest.raises(openai.BadRequestError, match="DSML"):
        c.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER], tool_choice="required")
    with pytest.raises(openai.BadRequestError, match="unknown keys"):
        c.chat.completions.create(model="tiny", messages=MSGS, extra_body={"chat_template_kwargs": {"frobnicate": True}})
    with pytest.raises(openai.BadRequestError, match="reasoning_effort"):
        c.chat.completions.create(model="tiny", messages=MSGS, reasoning_effort="extreme")


def test_dsv3_chat_thinking(base_dir, tmp_path, capsys, monkeypatch):
    """`dsv3 chat --thinking`: the prompt opens <think> on a V3.1-format model; the reasoning goes back as history
    through the template (which keeps only what follows </think>); a model with no thinking mode refuses the flag."""
    import io
    import sys

    from dsv3 import LLM, cli

    rc = cli.main(["chat", "--model", str(base_dir), "--thinking", "--dtype", "fp32"])
    assert rc == 2 and "has no thinking mode" in capsys.readouterr().err
    d = tmp_path / "m"
    shutil.copytree(base_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = dsv31.DEEPSEEK_V31_CHAT_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    prompts, replies = [], iter(["plan one</think>answer one", "plan two</think>answer two"])

    def scripted(self, prompt, params=None, lora=None):  # the reply a thinking model writes
        from dsv3.llm import StreamEvent
        prompts.append(self.tokenizer.decode(prompt["prompt_token_ids"], skip_special_tokens=False))
        yield StreamEvent(next(replies), None, "stop")

    monkeypatch.setattr(LLM, "stream", scripted)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nsecond\n/exit\n"))
    rc = cli.main(["chat", "--model", str(d), "--thinking", "--dtype", "fp32", "--max-tokens", "8"])
    assert rc == 0, capsys.readouterr().err
    assert prompts[0].endswith("<｜User｜>first<｜Assistant｜><think>")
    assert prompts[1].endswith("<｜User｜>first<｜Assistant｜></think>answer one<｜end▁of▁sentence｜>"
                               "<｜User｜>second<｜Assistant｜><think>")
