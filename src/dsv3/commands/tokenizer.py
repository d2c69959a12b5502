"""`dsv3 tokenizer train`: a DeepSeek-V3-style byte-level BPE trained on your own files."""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

from dsv3.data.tokenizer_train import TokenizerTrainError


def expand_globs(patterns: list[str]) -> list[Path]:
    """Every file the patterns name (recursive `**` allowed), sorted and de-duplicated, so runs are repeatable."""
    files: dict[Path, None] = {}
    for pattern in patterns:
        matches = [Path(m) for m in sorted(glob.glob(pattern, recursive=True)) if Path(m).is_file()]
        if not matches:
            raise TokenizerTrainError(f"--files {pattern!r} matches no files.")
        files.update(dict.fromkeys(matches))
    return list(files)


def _train(args: argparse.Namespace) -> int:
    from dsv3.commands.outputs import prepare_output_dir
    from dsv3.io.tokenizer import Tokenizer
    from dsv3.data.tokenizer_train import train_tokenizer

    files = expand_globs(args.files)
    prepare_output_dir(args.output, overwrite=args.overwrite)
    out = train_tokenizer(files, args.vocab_size, args.output, min_frequency=args.min_frequency,
                          model_max_length=args.model_max_length)
    tok = Tokenizer.from_dir(out)
    print(f"trained on {len(files)} files: wrote {out}/tokenizer.json ({tok.vocab_size} tokens), "
          "tokenizer_config.json, special_tokens_map.json",
          file=sys.stderr)
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", parser_class=type(parser))
    sub.required = True
    train = sub.add_parser("train", help="train a DeepSeek-V3-style byte-level BPE on text/code files")
    train.add_argument("--files", nargs="+", required=True, metavar="GLOB",
                       help="training files or glob patterns (quote them; ** recurses)")
    train.add_argument("--vocab-size", type=_positive, required=True, help="vocabulary size, special tokens included")
    train.add_argument("-o", "--output", type=Path, required=True, help="directory for tokenizer.json and configs")
    train.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    train.add_argument("--min-frequency", type=_positive, default=2, help="least count for a merge (default 2)")
    train.add_argument("--model-max-length", type=_positive, default=131072,
                       help="model_max_length written to tokenizer_config.json (default 131072)")
    train.set_defaults(func=_train)
