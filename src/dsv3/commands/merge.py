"""`dsv3 merge --model DIR --adapter A -o OUT`: fold a LoRA adapter into the base weights, write a plain checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from dsv3.errors import DSV3Error


def _merge(args: argparse.Namespace) -> int:
    from dsv3.lora.merge import merge_adapter
    from dsv3.commands.outputs import prepare_output_dir

    if args.model is not None and not Path(args.model).is_dir():
        raise DSV3Error(f"model directory {args.model} does not exist")
    if not Path(args.adapter).is_dir():
        raise DSV3Error(f"adapter directory {args.adapter} does not exist")
    prepare_output_dir(args.output, overwrite=args.overwrite)

    out = merge_adapter(args.model, args.adapter, args.output, dtype=args.dtype, progress=not args.quiet)
    print(f"merged {args.adapter} into {args.model or 'the default model'} -> {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("merge", help="merge a LoRA adapter into its base model",
                              description="W += scaling * B @ A for every adapted layer (in fp32, then cast), "
                                          "written as an ordinary HF-layout checkpoint with the base tokenizer.")
    p.add_argument("--model", metavar="DIR", help="base model directory (default: the embedded default model)")
    p.add_argument("--adapter", required=True, metavar="A", help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output checkpoint directory")
    p.add_argument("--dtype", default=None, help="dtype of the written weights (default: the base checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_merge)
