"""Tokenizer, chat template, incremental detokenizer and `dsv3 tokenizer train`.

Oracles: transformers' `apply_chat_template` (same Jinja environment, independent code), the
`tokenizers` library's own `DecodeStream`, and the DeepSeek-V3 prompt format written out by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers.decoders import DecodeStream

from dsv3.io.chat_template import DEEPSEEK_V3_CHAT_TEMPLATE, ChatTemplateError
from dsv3.errors import DSV3Error
from dsv3.io.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError
from dsv3.data.tokenizer_train import SPECIAL_TOKENS, TokenizerTrainError, train_tokenizer
from tiny_tokenizer import make_tiny_tokenizer, stdlib_sources

SRC = Path(__file__).resolve().parents[1] / "src"
TEXTS = [
    "hello world",
    "  leading and trailing  \n\n\tindented\n    four spaces\r\nwindows line\n",
    "你好，世界！深度求索的模型支持中文。",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 café naïve",
    "def fib(n: int) -> int:\n    \"\"\"Return F(n).\"\"\"\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "混合 mixed 123456789 ½ ∑ x² — “quotes” 'single' <tag>&amp;",
]
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Hi! 你好"},
    {"role": "assistant", "content": "Hello. How can I help?"},
    {"role": "user", "content": "Write `def f(x):` with\n  indentation."},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 0 and tok.bos_token_id not in ids[1:]
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == "<｜begin▁of▁sentence｜>" + text


def test_special_tokens_are_single_ids(tok: Tokenizer) -> None:
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert tok.vocab_size == 512 and tok.stop_token_ids == [1]
    assert tok.fim_tokens == tuple(tok.token_to_id(t) for t in ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"))
    for i, special in enumerate(SPECIAL_TOKENS):
        ids = tok.encode(f"x = 1{special}y", add_special_tokens=False)
        assert ids.count(i) == 1 and tok.token_to_id(special) == i and tok.id_to_token(i) == special
        assert tok.is_special(i) and tok.decode(ids) == "x = 1y"
    assert not tok.is_special(tok.encode("x", add_special_tokens=False)[0])


def _hf(tok_dir: Path, template: str):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"),
                                              bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>")
    hf.chat_template = template
    return hf


def test_chat_template_matches_transformers(tok: Tokenizer, tok_dir: Path) -> None:
    hf = _hf(tok_dir, tok.chat_template)
    for messages in (CHAT, CHAT[2:], CHAT[:3]):
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(messages) == want
        want_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        want_ids = want_ids if isinstance(want_ids, list) else want_ids["input_ids"]
        assert tok.apply_chat_template(messages, tokenize=True) == want_ids
    assert tok.apply_chat_template(CHAT[2:], add_generation_prompt=False) == hf.apply_chat_template(
        CHAT[2:], tokenize=False, add_generation_prompt=False)


def test_v3_template_text_and_format(tok: Tokenizer) -> None:
    # sha256 of `chat_template` in deepseek-ai/DeepSeek-V3's tokenizer_config.json (JSON-decoded)
    digest = hashlib.sha256(DEEPSEEK_V3_CHAT_TEMPLATE.encode()).hexdigest()
    assert digest == "3b8267e54b67df6500f231ffa969955cc9d26b3444a291ced4eb96ca7d3ca1ea"
    assert tok.chat_template == DEEPSEEK_V3_CHAT_TEMPLATE
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == \
        "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>"
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    call2 = {"type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None,
                                                         "tool_calls": [call, call2]},
                {"role": "tool", "content": "18C"}, {"role": "tool", "content": "sunny"},
                {"role": "assistant", "content": "18C and sunny."}]
    want = ("<｜begin▁of▁sentence｜><｜User｜>Weather?<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function"
            "<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>"
            "function<｜tool▁sep｜>get_time\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
            "<｜end▁of▁sentence｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>18C<｜tool▁output▁end｜>\n"
            "<｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜><｜tool▁outputs▁end｜>18C and sunny."
            "<｜end▁of▁sentence｜><｜Assistant｜>")
    assert tok.apply_chat_template(messages) == want


def test_config_variants_and_fallback_template(tok_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(tok_dir, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    del config["chat_template"]
    config["bos_token"] = {"__type": "AddedToken", "content": "<｜begin▁of▁sentence｜>", "lstrip": False}
    config["add_bos_token"] = False
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<｜end▁of▁sentence｜>"}}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 9, 1]}))
    t = Tokenizer.from_dir(d)
    assert (t.bos_token_id, t.pad_token_id, t.stop_token_ids) == (0, 1, [1, 9])
    assert t.encode("hi") == t.encode("hi", add_special_tokens=False)
    assert t.chat_template is None
    hf = _hf(d, DEEPSEEK_V3_CHAT_TEMPLATE)
    assert t.apply_chat_template(CHAT) == hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    config["chat_template"] = [{"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"},
                               {"name": "tool_use", "template": "{{ tools | tojson }}"}]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    t = Tokenizer.from_dir(d)
    assert t.apply_chat_template(CHAT[2:]) == "<｜begin▁of▁sentence｜>Hi! 你好"
    assert t.apply_chat_template(CHAT[2:], tools=[{"name": "<f>"}]) == '[{"name": "<f>"}]'


def test_bad_tokenizer_dirs_name_the_culprit(tok_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<missing>"}))
    with pytest.raises(DSV3Error, match="<missing>"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("text", [TEXTS[2], TEXTS[3], TEXTS[5]])
def test_incremental_detokenizer_streams_whole_characters(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    detok, stream, oracle, emitted = IncrementalDetokenizer(tok), DecodeStream(skip_special_tokens=True), "", ""
    for i, token_id in enumerate(ids):
        chunk = detok.push(token_id)
        assert "\ufffd" not in chunk
        emitted += chunk
        assert tok.decode(ids[: i + 1]).startswith(emitted)
        oracle += stream.step(tok.backend, token_id) or ""
    emitted += detok.flush()
    assert emitted == oracle == tok.decode(ids) == text
    assert any(len(c.encode()) > 1 for c in text)  # the text really has multi-byte characters


def test_incremental_detokenizer_prompt_specials_and_broken_tail(tok: Tokenizer) -> None:
    prompt = tok.apply_chat_template([{"role": "user", "content": "说"}], tokenize=True)
    ids = tok.encode("好的😀", add_special_tokens=False) + [tok.eos_token_id]
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt, skip_special_tokens=False)
    out = "".join(detok.push(i) for i in ids) + detok.flush()
    assert out == "好的😀<｜end▁of▁sentence｜>"
    emoji = tok.encode("😀", add_special_tokens=False)
    assert len(emoji) > 1  # a 512-token vocabulary spells the emoji in bytes
    detok = IncrementalDetokenizer(tok)
    assert [detok.push(i) for i in emoji[:-1]] == [""] * (len(emoji) - 1)
    tail = detok.flush()
    assert tail == tok.decode(emoji[:-1]) and tail.endswith("\ufffd")


def test_incremental_detokenizer_decodes_short_windows(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = tok.encode(TEXTS[4] * 20, add_special_tokens=False)
    detok, windows = IncrementalDetokenizer(tok), []
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda w, **kw: windows.append(len(w)) or decode(w, **kw))
    assert "".join(detok.push(i) for i in ids) == TEXTS[4] * 20
    assert len(ids) > 300 and max(windows) <= 2  # pure ASCII: every token completes; no re-decoding


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% set ns = namespace(__class__=1) %}{{ ns }}",
    "{{ messages.append(1) }}",
    "{{ raise_exception('no system role') }}",
    "{% for m in messages %}{{ m['content'] ",
])
def test_bad_or_escaping_templates_raise_dsv3_error(tok: Tokenizer, template: str) -> None:
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template(CHAT, chat_template=template)


def test_template_helpers_match_transformers(tok: Tokenizer, tok_dir: Path) -> None:
    template = ("{% for m in messages %}\n  {% if loop.index > 2 %}{% break %}{% endif %}\n{{ m | tojson }}\n"
                "{% endfor %}\n{{ tools | tojson(indent=1) }}{{ strftime_now('%Y') | length }}{{ day }}")
    tools = [{"name": "f", "description": "a < b & 'c'"}]
    want = _hf(tok_dir, template).apply_chat_template(CHAT, tools=tools, tokenize=False, day="mon")
    assert tok.apply_chat_template(CHAT, add_generation_prompt=False, chat_template=template, tools=tools,
                                   day="mon") == want
    assert "a < b & 'c'" in want and want.count('"role"') == 2 and want.endswith("4mon")
    assert want.startswith('{"role": "system"') and "}\n[" in want  # trim_blocks and lstrip_blocks at work


def test_training_is_deterministic_and_validated(tmp_path: Path) -> None:
    a, b = make_tiny_tokenizer(tmp_path / "a", 300), make_tiny_tokenizer(tmp_path / "b", 300)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    config = json.loads((a / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["pad_token"] == "<｜▁pad▁｜>"
    assert json.loads((a / "tokenizer.json").read_text())["decoder"]["type"] == "ByteLevel"
    assert Tokenizer.from_dir(a).vocab_size == 300
    with pytest.raises(TokenizerTrainError, match="vocab-size 100"):
        train_tokenizer(stdlib_sources(), 100, tmp_path / "c")
    (tmp_path / "bin.dat").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(TokenizerTrainError, match="bin.dat"):
        train_tokenizer([tmp_path / "bin.dat"], 300, tmp_path / "c")
    train_tokenizer([tmp_path / "bin.dat", *stdlib_sources()], 300, tmp_path / "d", show_progress=False)
    assert (tmp_path / "d" / "tokenizer.json").read_bytes() == (a / "tokenizer.json").read_bytes()  # skipped


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "dsv3", *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_train_and_bad_glob(tmp_path: Path) -> None:
    root = stdlib_sources()[0].parent
    out = tmp_path / "tok"
    r = _cli("tokenizer", "train", "--files", str(root / "text*.py"), str(root / "bisect.py"),
             "--vocab-size", "320", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert Tokenizer.from_dir(out).vocab_size == 320 and "320 tokens" in r.stderr
    r = _cli("tokenizer", "train", "--files", str(tmp_path / "nothing*.txt"), "--vocab-size", "320", "-o", str(out))
    assert r.returncode == 2 and "nothing*.txt" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
