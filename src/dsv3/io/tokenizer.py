"""Tokenizer: `tokenizer.json` through the `tokenizers` library (or Kimi-K2/Moonlight's `tiktoken.model` through
tiktoken, `dsv3.io.tiktoken_tokenizer`), special tokens from the model's files.

transformers v5 loads DeepSeek's byte-level BPE (declared `LlamaTokenizerFast`) with a Metaspace
pre-tokenizer that eats spaces, so dsv3 never goes through `AutoTokenizer`: the BPE comes straight
from `tokenizer.json`; bos/eos/pad, `add_bos_token` and the chat template from
`tokenizer_config.json` (and `special_tokens_map.json`); extra stop ids from
`generation_config.json`. `IncrementalDetokenizer` turns a stream of ids into text without ever
emitting half of a UTF-8 character.
"""

from __future__ import annotations

import functools

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import tokenizers

from dsv3.io.chat_template import (DEEPSEEK_V3_CHAT_TEMPLATE, ChatTemplateError, _check_messages, render_chat_template,
                                   select_template)
from dsv3.io.encodings import ENCODERS, ChatFormat, chat_format
from dsv3.io.encodings import encode as encode_with
from dsv3.io.encodings.dsml import DSMLError
from dsv3.errors import DSV3Error

DEEPSEEK_BOS = "<｜begin▁of▁sentence｜>"
DEEPSEEK_EOS = "<｜end▁of▁sentence｜>"
# Fill-in-the-middle spellings, (prefix, suffix, middle): DeepSeek-Coder/V3, Qwen, StarCoder.
FIM_SPELLINGS = (
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
)
SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


LONG_TEXT = 8192  # characters (or ids): longer texts are encoded (decoded) with the GIL released


class TokenizerError(DSV3Error):
    """A tokenizer file is missing or malformed, or a token the config names is not in the vocabulary."""


class FimTokens(NamedTuple):
    """Ids for prefix-suffix-middle prompts: `prefix` + code before, `suffix` + code after, `middle`."""

    prefix: int
    suffix: int
    middle: int


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object.")
    return data


def _token_content(value: Any, key: str, path: Path) -> str | None:
    """bos/eos/pad may be spelled "<s>" or {"content": "<s>", ...} (AddedToken dicts)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{key} in {path} must be a string or a {{'content': ...}} dict.")


class Tokenizer:
    """A byte-level BPE plus what the model directory says about special tokens and chat format."""

    def __init__(self, backend: tokenizers.Tokenizer, *, special: Mapping[str, str | None] | None = None,
                 add_bos_token: bool | None = None, add_eos_token: bool = False,
                 chat_template: str | list[dict[str, str]] | None = None, extra_eos_ids: Iterable[int] = (),
                 source: str = "the tokenizer", model_type: str | None = None) -> None:
        self.backend = backend
        self.source = source
        self.special_tokens = {k: v for k, v in (special or {}).items() if v is not None}
        self.add_bos_token = add_bos_token  # None: tokenizer.json's own post-processor decides
        self.add_eos_token = add_eos_token
        self.chat_template = chat_template
        self.model_type = model_type  # config.json's: picks V3.2's / V4's Python encoder when there is no template
        self._ids = {}
        for key, content in self.special_tokens.items():
            tid = backend.token_to_id(content)
            if tid is None and key in ("bos_token", "eos_token"):
                raise TokenizerError(f"{key} {content!r} from {source} is not in the vocabulary.")
            self._ids[key] = tid
        self._extra_eos = [int(i) for i in extra_eos_ids]
        self._special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self._special_ids.update(i for i in self._ids.values() if i is not None)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (else Kimi/Moonlight's `tiktoken.model`) and the json files next to it from a model directory."""
        from dsv3.io.tiktoken_tokenizer import KIMI_CHAT_TEMPLATE, TIKTOKEN_FILE, TiktokenBackend

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        config_path = model_dir / "tokenizer_config.json"
        config = _read_json(config_path) or {}
        fallback_template = None
        if path.is_file():
            try:
                backend = tokenizers.Tokenizer.from_file(str(path))
            except Exception as e:  # the Rust side raises a bare Exception on malformed files
                raise TokenizerError(f"{path} could not be loaded by the tokenizers library ({e}).") from None
        elif (model_dir / TIKTOKEN_FILE).is_file():
            backend, path, fallback_template = TiktokenBackend.from_dir(model_dir, config), model_dir / TIKTOKEN_FILE, KIMI_CHAT_TEMPLATE
        else:
            raise TokenizerError(f"no tokenizer.json (or {TIKTOKEN_FILE}) in {model_dir} (looked for {path}).")
        special = {k: _token_content(config.get(k), k, config_path) for k in SPECIAL_KEYS}
        map_path = model_dir / "special_tokens_map.json"
        for key, value in (_read_json(map_path) or {}).items():
            if key in SPECIAL_KEYS and value is not None:  # transformers lets this file win
                special[key] = _token_content(value, key, map_path)
        if not config and special["bos_token"] is None and backend.token_to_id(DEEPSEEK_BOS) is not None:
            special["bos_token"], special["eos_token"] = DEEPSEEK_BOS, DEEPSEEK_EOS
        template = config.get("chat_template")
        jinja_path = model_dir / "chat_template.jinja"
        if template is None and jinja_path.is_file():
            template = jinja_path.read_text(encoding="utf-8")
        if template is None:
            template = fallback_template
        gen = _read_json(model_dir / "generation_config.json") or {}
        eos = gen.get("eos_token_id")
        extra = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
        add_bos = config.get("add_bos_token")
        if add_bos is None and fallback_template is not None:
            add_bos = False  # tiktoken has no post-processor: Kimi's encode adds nothing unless asked
        return cls(backend, special=special, add_bos_token=None if add_bos is None else bool(add_bos),
                   add_eos_token=bool(config.get("add_eos_token", False)), chat_template=template,
                   extra_eos_ids=extra, source=str(config_path if config else path),
                   model_type=(_read_json(model_dir / "config.json") or {}).get("model_type"))

    # -- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS (and EOS) as tokenizer_config.json asks."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a string, got {type(text).__name__}.")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TokenizerError(f"the text holds an unpaired UTF-16 surrogate ({text[e.start]!r} at character {e.start}), "
                                 "which is not valid Unicode text") from None
        # the Rust encoder holds the GIL for `encode` but releases it for `encode_batch`: long texts go that way,
        # so a server thread tokenizing a long prompt does not stop every other thread (seconds for megabytes)
        def one(t: str, special: bool) -> Any:
            if len(t) > LONG_TEXT:
                return self.backend.encode_batch([t], add_special_tokens=special)[0]
            return self.backend.encode(t, add_special_tokens=special)
        if self.add_bos_token is None:
            return one(text, add_special_tokens).ids
        ids = one(text, False).ids
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None:
                ids.insert(0, self.bos_token_id)
            if self.add_eos_token and self.eos_token_id is not None:
                ids.append(self.eos_token_id)
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` for many texts; the Rust side spreads the work over threads."""
        if self.add_bos_token is None:
            return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        bos = [self.bos_token_id] if add_special_tokens and self.add_bos_token and self.bos_token_id is not None else []
        eos = [self.eos_token_id] if add_special_tokens and self.add_eos_token and self.eos_token_id is not None else []
        return [bos + e.ids + eos for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest vocabulary entry, in characters: a text of n characters holds at least n / this many tokens."""
        return max((len(t) for t in self.backend.get_vocab(with_added_tokens=True)), default=1)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if len(ids) > LONG_TEXT:  # `decode_batch` releases the GIL, as `encode_batch` does
            return self.backend.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def chat_format(self) -> ChatFormat:
        """Which prompt and tool-call format this model uses (see dsv3.io.encodings)."""
        return chat_format(self.chat_template, self.model_type)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, tools: Sequence[Mapping[str, Any]] | None = None,
                            chat_template: str | None = None, **extra: Any) -> str | list[int]:
        """Render `messages` with the model's chat template: its own Jinja template when it ships one, else
        DeepSeek-V3.2's / V4's encoder for those model types, else DeepSeek-V3's template.

        `thinking=True` (or `enable_thinking`) opens the reply with `<think>` where the format has a thinking
        mode; the encoders also take `reasoning_effort` (V4) and `drop_thinking`. The rendered text already
        holds BOS, so `tokenize=True` encodes it without special tokens.
        """
        source = select_template(chat_template or self.chat_template, tools)
        if source is None and self.model_type in ENCODERS:
            _check_messages(messages)
            thinking = extra.get("thinking", extra.get("enable_thinking", False))
            try:
                text = encode_with(self.model_type, messages, tools=tools, thinking=bool(thinking),
                                   reasoning_effort=extra.get("reasoning_effort"),
                                   drop_thinking=bool(extra.get("drop_thinking", True)))
            except (DSMLError, KeyError, TypeError, AttributeError) as e:
                raise ChatTemplateError(f"the {self.model_type} chat encoder refused the messages: {e}") from None
            return self.encode(text, add_special_tokens=False) if tokenize else text
        origin = "the chat template passed in" if chat_template else f"the chat template of {self.source}"
        if source is None:
            source, origin = DEEPSEEK_V3_CHAT_TEMPLATE, "the bundled DeepSeek-V3 chat template"
        if "enable_thinking" in extra and "thinking" not in extra:
            extra = {**extra, "thinking": extra["enable_thinking"]}  # V3.1's template reads `thinking`
        variables = {**self.special_tokens, **extra}
        text = render_chat_template(source, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                    origin=origin, **variables)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # -- vocabulary ---------------------------------------------------------------------------

    @property
    def bos_token_id(self) -> int | None:
        return self._ids.get("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._ids.get("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._ids.get("pad_token")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def stop_token_ids(self) -> list[int]:
        """EOS first, then any other eos ids generation_config.json lists (chat models often add one)."""
        ids = [self.eos_token_id] if self.eos_token_id is not None else []
        return ids + [i for i in dict.fromkeys(self._extra_eos) if i not in ids]

    @property
    def fim_tokens(self) -> FimTokens | None:
        for spelling in FIM_SPELLINGS:
            ids = [self.backend.token_to_id(t) for t in spelling]
            if None not in ids:
                return FimTokens(*ids)
        return None

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids


class IncrementalDetokenizer:
    """Streams text token by token, holding back bytes until they complete a UTF-8 character.

    The prefix/read offsets of vLLM and HF's TextStreamer: each push decodes only the few tokens
    since the last emitted text (plus a short context window, so decoders that drop a leading
    space see it), and emits the part past the already-emitted text once that part no longer ends
    in U+FFFD. Work per token is bounded by the pending window, not by the sequence length.
    """

    CONTEXT = 5  # prompt tokens decoded as context, as vLLM does

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = [] if prompt_ids is None else [int(i) for i in prompt_ids]
        self.read_offset = len(self.ids)
        self.prefix_offset = max(self.read_offset - self.CONTEXT, 0)
        self._prefix_text: str | None = None

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def _advance(self, force: bool) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self.prefix_offset, self.read_offset)
        text = self._decode(self.prefix_offset)
        if len(text) <= len(self._prefix_text) or (text.endswith("\ufffd") and not force):
            return ""
        delta = text[len(self._prefix_text):]
        self.prefix_offset, self.read_offset, self._prefix_text = self.read_offset, len(self.ids), None
        return delta

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes ("" while a character is partial)."""
        self.ids.append(int(token_id))
        return self._advance(force=False)

    def flush(self) -> str:
        """Text still held back at the end of generation (a genuinely broken tail decodes to U+FFFD)."""
        return self._advance(force=True)
