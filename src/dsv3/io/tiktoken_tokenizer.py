"""Kimi-K2 and Moonlight tokenizers: a `tiktoken.model` BPE plus `tokenizer_config.json`, read with tiktoken.

Moonshot's models ship no `tokenizer.json`: their tokenizer (`tokenization_kimi.py`, `tokenization_moonshot.py`)
is tiktoken over the ranks in `tiktoken.model` (one `base64(token bytes) rank` per line) with Kimi's split
pattern (Han characters in runs of their own, o200k-style words otherwise), and a block of 256 special ids
right after the base vocabulary: those named in `tokenizer_config.json`'s `added_tokens_decoder` ([BOS],
[EOS], <|im_end|>, <|im_user|>, ...), the rest `<|reserved_token_{id}|>`. `TiktokenBackend` gives that
the few methods `dsv3.io.tokenizer.Tokenizer` calls on a `tokenizers.Tokenizer`, so the rest of dsv3
(chat templates, stop ids, streaming detokenization, the server) is the same for both. Special tokens in
text are encoded as special tokens, as Kimi's `encode` does by default; long texts are cut as Kimi cuts
them (400,000 characters, 25,000 of one kind at most) so tiktoken's regex never sees longer pieces.
"""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from dsv3.errors import DSV3Error

TIKTOKEN_FILE = "tiktoken.model"
NUM_RESERVED_SPECIAL = 256
KIMI_PATTERN = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
# Moonlight's template (its tokenizer_config.json), used only when the directory has none: Kimi's and Moonlight's
# turns are <|im_{role}|>{role}<|im_middle|>{content}<|im_end|>, with a default system turn.
KIMI_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}<|im_system|>{%- endif -%}"
    "{%- if message['role'] == 'user' -%}<|im_user|>{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}<|im_assistant|>{%- endif -%}"
    "{%- if message['role'] == 'tool' -%}<|im_system|>{%- endif -%}"
    "{{ message['role'] }}<|im_middle|>{{ message['content'] }}<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)


class TiktokenError(DSV3Error):
    """`tiktoken.model` or the special tokens around it are malformed."""


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of bytes (what `id_to_token` shows, as byte-level BPE tokenizers do)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


@dataclass(frozen=True)
class Encoded:
    ids: list[int]


@dataclass(frozen=True)
class AddedToken:
    content: str
    special: bool = True


class ByteLevel:
    """Marks the backend's `id_to_token` spelling as GPT-2 byte-level (what `serve.generation.token_bytes` checks)."""


def read_ranks(path: Path) -> dict[bytes, int]:
    """`tiktoken.model`: one `base64(token) rank` per line."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, base64.binascii.Error):
            raise TiktokenError(f"{path}: line {n} is not 'base64-token rank'") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TiktokenError(f"{path}: ranks are not 0..{len(ranks) - 1}, each once")
    return ranks


def pieces(text: str) -> Iterable[str]:
    """Kimi's cuts: chunks of at most 400,000 characters, each split where a run of whitespace or of non-whitespace
    passes 25,000 characters."""
    for i in range(0, max(len(text), 1), MAX_ENCODE_CHARS):
        chunk = text[i:i + MAX_ENCODE_CHARS]
        start, run, kind = 0, 0, None
        for j, ch in enumerate(chunk):
            space = ch.isspace()
            run = run + 1 if space == kind else 1
            kind = space
            if run > MAX_RUN_CHARS:
                yield chunk[start:j]
                start, run = j, 1
        yield chunk[start:]


class TiktokenBackend:
    """tiktoken behind the `tokenizers.Tokenizer` methods `dsv3.io.tokenizer.Tokenizer` uses."""

    decoder = ByteLevel()

    def __init__(self, ranks: dict[bytes, int], specials: dict[str, int], pattern: str = KIMI_PATTERN, name: str = "kimi"):
        import tiktoken

        self.encoding = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
        self.specials = dict(specials)
        self._special_ids = {i: t for t, i in specials.items()}
        self._base = len(ranks)

    @classmethod
    def from_dir(cls, model_dir: Path, config: dict) -> "TiktokenBackend":
        """`tiktoken.model` and the `added_tokens_decoder` of `tokenizer_config.json` (Kimi-K2 / Moonlight's layout)."""
        path = Path(model_dir) / TIKTOKEN_FILE
        ranks = read_ranks(path)
        named: dict[int, str] = {}
        for key, entry in (config.get("added_tokens_decoder") or {}).items():
            content = entry.get("content") if isinstance(entry, dict) else None
            if not str(key).isdigit() or not isinstance(content, str):
                raise TiktokenError(f"tokenizer_config.json: added_tokens_decoder[{key!r}] is not an id with a 'content'")
            named[int(key)] = content
        base = len(ranks)
        outside = sorted(i for i in named if not base <= i < base + NUM_RESERVED_SPECIAL)
        if outside:
            raise TiktokenError(f"tokenizer_config.json: special token id {outside[0]} is outside the {NUM_RESERVED_SPECIAL} "
                                f"ids after the {base} of {TIKTOKEN_FILE}")
        specials = {named.get(i, f"<|reserved_token_{i}|>"): i for i in range(base, base + NUM_RESERVED_SPECIAL)}
        return cls(ranks, specials)

    # -- the tokenizers.Tokenizer surface --------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> Encoded:
        ids: list[int] = []
        for piece in pieces(text):
            ids += self.encoding.encode(piece, allowed_special="all")
        return Encoded(ids)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[Encoded]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.encoding.n_vocab]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self.encoding.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def token_to_id(self, token: str) -> int | None:
        if token in self.specials:
            return self.specials[token]
        try:
            return self.encoding.encode_single_token(token.encode("utf-8"))
        except KeyError:
            return None

    def id_to_token(self, token_id: int) -> str | None:
        token_id = int(token_id)
        if token_id in self._special_ids:
            return self._special_ids[token_id]
        if not 0 <= token_id < self._base:
            return None
        table = byte_to_unicode()
        return "".join(table[b] for b in self.encoding.decode_single_token_bytes(token_id))

    def token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(int(token_id))

    def get_vocab(self, with_added_tokens: bool = True) -> dict[str, int]:
        vocab = {self.id_to_token(i): i for i in range(self._base)}
        return vocab | (self.specials if with_added_tokens else {})

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self._base + (len(self.specials) if with_added_tokens else 0)

    def get_added_tokens_decoder(self) -> dict[int, Any]:
        return {i: AddedToken(t) for t, i in self.specials.items()}
