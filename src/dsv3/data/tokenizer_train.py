"""Train a DeepSeek-V3-style byte-level BPE tokenizer on the user's own text.

The result is laid out like DeepSeek-V3's tokenizer: the same digit / CJK / word pre-tokenizer
splits followed by a GPT-2 ByteLevel mapping (so any byte sequence round-trips), the ByteLevel
decoder, and the special tokens the V3 chat template and fill-in-the-middle prompts use, spelled
with DeepSeek's full-width bar U+FF5C and U+2581. BOS is id 0 and EOS id 1, as in V3.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterator, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from dsv3.io.chat_template import DEEPSEEK_V3_CHAT_TEMPLATE
from dsv3.errors import DSV3Error

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
FIM = ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")  # prefix, suffix, middle (DeepSeek-Coder)
CHAT = (
    "<｜User｜>", "<｜Assistant｜>",
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>",
    "<｜tool▁sep｜>",
)
SPECIAL_TOKENS = (BOS, EOS, PAD, *FIM, *CHAT)
# DeepSeek-V3's pre-tokenizer: numbers in groups of up to three digits, runs of CJK/kana, then
# GPT-style words, punctuation and whitespace.
V3_SPLITS = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
MIN_VOCAB = len(SPECIAL_TOKENS) + 256  # every special token plus the 256 byte symbols


class TokenizerTrainError(DSV3Error):
    """The training files or the requested vocabulary size cannot produce a tokenizer."""


def _texts(files: Sequence[Path], show_progress: bool, skipped: list[Path]) -> Iterator[str]:
    """File contents; files that are not UTF-8 (binaries, latin-1 sources) are skipped and recorded."""
    for path in tqdm(files, desc="reading", unit="file", disable=not show_progress):
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            skipped.append(path)
        except OSError as e:
            raise TokenizerTrainError(f"{path} cannot be read ({e.strerror}).") from None


def build_untrained() -> Tokenizer:
    """An empty BPE with DeepSeek-V3's normalisation-free byte-level pipeline."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in V3_SPLITS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(files: Sequence[str | Path], vocab_size: int, out_dir: str | Path, min_frequency: int = 2,
                    model_max_length: int = 131072, show_progress: bool = True) -> Path:
    """Train on `files`, write tokenizer.json + tokenizer_config.json + special_tokens_map.json to `out_dir`."""
    paths = [Path(f) for f in files]
    if not paths:
        raise TokenizerTrainError("no training files were given.")
    for p in paths:
        if not p.is_file():
            raise TokenizerTrainError(f"training file {p} does not exist or is not a file.")
    if vocab_size < MIN_VOCAB:
        raise TokenizerTrainError(f"--vocab-size {vocab_size} is too small; it must be at least {MIN_VOCAB} "
                                  f"(256 byte symbols + {len(SPECIAL_TOKENS)} special tokens).")
    if min_frequency < 1:
        raise TokenizerTrainError(f"min_frequency must be at least 1, got {min_frequency}.")
    tok = build_untrained()
    # The Rust progress bars print stray newlines on stdout when it is not a terminal.
    rust_progress = show_progress and sys.stdout.isatty()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=rust_progress,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    skipped: list[Path] = []
    tok.train_from_iterator(_texts(paths, show_progress, skipped), trainer=trainer, length=len(paths))
    if len(skipped) == len(paths):
        raise TokenizerTrainError(f"none of the training files is UTF-8 text (first: {skipped[0]}).")
    if skipped:
        print(f"skipped {len(skipped)} files that are not UTF-8 text, e.g. {skipped[0]}", file=sys.stderr)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    write_tokenizer_config(out, model_max_length)
    return out


def write_tokenizer_config(out: Path, model_max_length: int) -> None:
    """The two json files transformers and dsv3 read next to tokenizer.json (V3's field values)."""
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": DEEPSEEK_V3_CHAT_TEMPLATE,
    }
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        (out / name).write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
