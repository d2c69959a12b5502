"""`dsv3 data build`: text/code files -> deduplicated, split, tokenized shards; `dsv3 data instructions`: chat pairs
mined from them; `functions`, `packages`, `passkey`: annealing and long-context corpora written as files."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from dsv3.errors import DSV3Error


def _build(args: argparse.Namespace) -> int:
    from dsv3.data.builder import build
    from dsv3.commands.outputs import prepare_output_dir

    # a re-run into the same directory is the rebuild it is for: `build` replaces its own shards and manifest
    prepare_output_dir(args.output, overwrite=True)

    m = build(args.inputs, args.tokenizer, args.output, include=args.include,
              heldout_fraction=args.heldout_fraction, shard_tokens=args.shard_tokens,
              near_dup_threshold=args.near_dup_threshold, seed=args.seed, progress=not args.quiet)
    t, d = m["totals"], m["dedup"]
    print(f"{args.output}: train {t['train']['files']} files / {t['train']['tokens']} tokens, "
          f"heldout {t['heldout']['files']} files / {t['heldout']['tokens']} tokens ({m['dtype']}); "
          f"removed {d['exact_removed']} exact and {d['near_removed']} near duplicates, "
          f"skipped {d['skipped']['empty']} empty and {d['skipped']['binary_or_not_utf8']} binary files")
    return 0


def _check_filters(args: argparse.Namespace) -> None:
    if not 0 <= args.min_body <= args.max_body:
        raise DSV3Error(f"--min-body {args.min_body} and --max-body {args.max_body} must satisfy 0 <= min <= max.")
    if args.max_chars < 1:
        raise DSV3Error(f"--max-chars {args.max_chars} must be a positive number of characters.")


def _instructions(args: argparse.Namespace) -> int:
    from dsv3.data.instructions import mine, split_files, write_jsonl
    from dsv3.commands.outputs import prepare_output_file

    _check_filters(args)
    files = split_files(args.shards, args.split, args.inputs)
    prepare_output_file(args.output)
    recs, stats = mine(files, progress=not args.quiet, min_body=args.min_body, max_body=args.max_body, max_chars=args.max_chars)
    if not recs:
        raise DSV3Error(f"no function with a docstring in the {args.split} split of {args.shards} passed the filters.")
    write_jsonl(recs, args.output)
    print(f"{args.output}: {stats['records']} records ({stats['describe']} write-a-function, "
          f"{stats['records'] - stats['describe']} complete-the-body) from {stats['kept']} of {stats['functions']} "
          f"documented functions in {stats['files']} {args.split} files; {stats['duplicates']} duplicate functions dropped")
    return 0


def _functions(args: argparse.Namespace) -> int:
    from dsv3.data.functions import write_functions
    from dsv3.data.instructions import split_files
    from dsv3.commands.outputs import prepare_output_dir

    _check_filters(args)
    files = split_files(args.shards, args.split, args.inputs)
    out = prepare_output_dir(args.output, overwrite=args.overwrite)
    for stale in out.glob("*.py"):  # --overwrite: an earlier run's functions (named by hash) must not stay mixed in
        if re.fullmatch(r"[0-9a-f]{20}", stale.stem):
            stale.unlink()
    stats = write_functions(files, args.output, progress=not args.quiet,
                            min_body=args.min_body, max_body=args.max_body, max_chars=args.max_chars)
    if not stats["kept"]:
        raise DSV3Error(f"no function with a docstring in the {args.split} split of {args.shards} passed the filters.")
    print(f"{args.output}: {stats['kept']} functions ({stats['chars']} characters) from {stats['functions']} documented "
          f"functions in {stats['files']} {args.split} files; {stats['duplicates']} duplicates dropped")
    return 0


def _packages(args: argparse.Namespace) -> int:
    from dsv3.data.instructions import split_files
    from dsv3.data.long_docs import package_documents
    from dsv3.commands.outputs import prepare_output_dir

    if not 0 < args.min_chars <= args.max_chars:
        raise DSV3Error(f"--min-chars {args.min_chars} and --max-chars {args.max_chars} must satisfy 0 < min <= max.")
    files = split_files(args.shards, args.split, args.inputs)
    out = prepare_output_dir(args.output, overwrite=args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    n = chars = 0
    for name, text in package_documents(files, args.min_chars, args.max_chars, progress=not args.quiet):
        (out / (re.sub(r"[^A-Za-z0-9_.#-]+", "__", name) + ".py")).write_text(text, encoding="utf-8")
        n, chars = n + 1, chars + len(text)
    if not n:
        raise DSV3Error(f"no directory of the {args.split} split of {args.shards} holds {args.min_chars} characters.")
    print(f"{args.output}: {n} package documents ({chars} characters) from {len(files)} {args.split} files")
    return 0


def _passkey(args: argparse.Namespace) -> int:
    from dsv3.data.long_docs import NAMES, passkey_documents
    from dsv3.commands.outputs import prepare_output_dir

    if not 0 < args.min_chars <= args.max_chars or args.count < 1:
        raise DSV3Error("--count must be positive and --min-chars/--max-chars satisfy 0 < min <= max.")
    if not 1 <= args.needles <= len(NAMES):
        raise DSV3Error(f"--needles must be 1 to {len(NAMES)} (one name each), got {args.needles}.")
    texts = []
    for d in args.inputs:
        if not Path(d).is_dir():
            raise DSV3Error(f"--inputs {d} does not exist or is not a directory.")
        texts += [p.read_text(encoding="utf-8") for p in sorted(Path(d).glob("*.py"))]
    if not texts:
        raise DSV3Error(f"no .py files in {' '.join(args.inputs)} (the output of `dsv3 data packages`).")
    out = prepare_output_dir(args.output, overwrite=args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    try:
        for i, doc in enumerate(passkey_documents(texts, args.count, args.min_chars, args.max_chars, args.seed,
                                                         args.needles)):
            (out / f"passkey-{i:06d}.py").write_text(doc, encoding="utf-8")
    except ValueError as e:
        raise DSV3Error(str(e)) from None
    print(f"{args.output}: {args.count} passkey documents of {args.min_chars}-{args.max_chars} characters, "
          f"{args.needles} needle{'s' * (args.needles > 1)} each")
    return 0


def _function_args(p: argparse.ArgumentParser, func, metavar: str, output: str, min_body: int, max_chars: int) -> None:
    """The options `instructions` and `functions` share: which split of which shards, and the function filters."""
    p.set_defaults(func=func)
    p.add_argument("--inputs", nargs="+", default=None, metavar="DIR",
                   help="directories the shards were built from (default: those the manifest records)")
    p.add_argument("--shards", required=True, metavar="DIR", help="shard directory whose manifest.json gives each file's split")
    p.add_argument("-o", "--output", required=True, metavar=metavar, help=output)
    p.add_argument("--split", choices=("train", "heldout"), default="train", help="which files to read (default: train)")
    p.add_argument("--min-body", type=int, default=min_body,
                   help=f"fewest non-blank body lines after the docstring (default {min_body})")
    p.add_argument("--max-body", type=int, default=40, help="most body lines (default 40)")
    p.add_argument("--max-chars", type=int, default=max_chars, help=f"longest function source in characters (default {max_chars})")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


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
    _function_args(sub.add_parser(
        "instructions", help="mine chat instruction pairs from the functions of one split",
        description="Every top-level function or method with a docstring in the files of one split of a shard manifest "
                    "becomes 'write a function `f(args)` that ...' and 'complete this function' chat records "
                    "(JSONL, {messages}) for `dsv3 finetune`."), _instructions, "FILE.jsonl", "output JSONL file", 2, 1500)
    fn = sub.add_parser(
        "functions", help="write the documented functions of one split as files (an annealing corpus)",
        description="Every top-level function or method with a docstring in the files of one split of a shard manifest "
                    "that passes the filters is written, dedented, as one .py file in OUT (deduplicated), for "
                    "`dsv3 data build` and a `mix` source of `dsv3 pretrain`.")
    _function_args(fn, _functions, "OUT", "output directory of .py files", 1, 800)
    fn.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    pk = sub.add_parser(
        "packages", help="write each directory's modules, in import order, as one long document",
        description="The files of one split of a shard manifest, grouped by directory; each directory's modules "
                    "ordered so that a module follows the siblings it imports, concatenated under '# file:' lines "
                    "into documents of at least --min-chars (a long-context corpus for `dsv3 data build`).")
    pk.set_defaults(func=_packages)
    pk.add_argument("--inputs", nargs="+", default=None, metavar="DIR",
                    help="directories the shards were built from (default: those the manifest records)")
    pk.add_argument("--shards", required=True, metavar="DIR", help="shard directory whose manifest.json gives each file's split")
    pk.add_argument("-o", "--output", required=True, metavar="OUT", help="output directory of .py documents")
    pk.add_argument("--split", choices=("train", "heldout"), default="train", help="which files to read (default: train)")
    pk.add_argument("--min-chars", type=int, default=20_000, help="shortest document in characters (default 20000)")
    pk.add_argument("--max-chars", type=int, default=2_000_000, help="longest document before it is cut at a file (default 2e6)")
    pk.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    pk.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    pp = sub.add_parser(
        "passkey", help="write synthetic passkey-retrieval documents over long documents",
        description="Each document is a stretch of the input documents with NAME = \"12345\" on a line of its own at a "
                    "random depth and assert NAME == \"12345\" at the end (names other than PASSKEY, which "
                    "`dsv3 eval needle` asks for).")
    pp.set_defaults(func=_passkey)
    pp.add_argument("--inputs", nargs="+", required=True, metavar="DIR", help="directories of .py documents (`dsv3 data packages`)")
    pp.add_argument("-o", "--output", required=True, metavar="OUT", help="output directory")
    pp.add_argument("--count", type=int, default=2000, help="documents to write (default 2000)")
    pp.add_argument("--min-chars", type=int, default=2_000, help="shortest stretch in characters (default 2000)")
    pp.add_argument("--max-chars", type=int, default=24_000, help="longest stretch in characters (default 24000)")
    pp.add_argument("--needles", type=int, default=1, help="keys per document, each under its own name, all asked "
                    "for at the end in a random order (default 1)")
    pp.add_argument("--seed", type=int, default=0, help="seed of the stretches, depths, names and keys")
    pp.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
