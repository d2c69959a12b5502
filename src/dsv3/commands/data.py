"""`dsv3 data build`: turn text/code files into deduplicated, split, tokenized shards."""

from __future__ import annotations

import argparse


def _build(args: argparse.Namespace) -> int:
    from dsv3.data.builder import build

    m = build(args.inputs, args.tokenizer, args.output, include=args.include,
              heldout_fraction=args.heldout_fraction, shard_tokens=args.shard_tokens,
              near_dup_threshold=args.near_dup_threshold, seed=args.seed, progress=not args.quiet)
    t, d = m["totals"], m["dedup"]
    print(f"{args.output}: train {t['train']['files']} files / {t['train']['tokens']} tokens, "
          f"heldout {t['heldout']['files']} files / {t['heldout']['tokens']} tokens ({m['dtype']}); "
          f"removed {d['exact_removed']} exact and {d['near_removed']} near duplicates, "
          f"skipped {d['skipped']['empty']} empty and {d['skipped']['binary_or_not_utf8']} binary files")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="build pretraining token shards")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION", parser_class=type(data))
    sub.required = True
    p = sub.add_parser("build", help="dedup, split and tokenize files into memory-mapped shards",
                       description="Discover text/code files, drop exact and near duplicates, split by file, "
                                   "tokenize and write uint16/uint32 shards plus manifest.json.")
    p.add_argument("--inputs", nargs="+", required=True, metavar="DIR_OR_GLOB", help="directories, files or globs ('**' recurses)")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="directory with tokenizer.json and tokenizer_config.json")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output directory")
    p.add_argument("--include", action="append", metavar="PATTERN", help="file-name pattern to keep, e.g. '*.py' (repeatable)")
    p.add_argument("--heldout-fraction", type=float, default=0.01, help="share of files held out (default 0.01)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file (default 1e8)")
    p.add_argument("--near-dup-threshold", type=float, default=0.85, help="MinHash Jaccard at which a file is a near duplicate")
    p.add_argument("--seed", type=int, default=0, help="seed of the split hash and MinHash functions")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_build)
