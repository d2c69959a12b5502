"""`dsv3 finetune --config FILE.yaml`: LoRA instruction fine-tuning; every YAML key is also a flag."""

from __future__ import annotations

import argparse


def _finetune(args: argparse.Namespace) -> int:
    from dsv3.lora.train_config import FinetuneConfig, load_config
    from dsv3.lora.trainer import finetune
    import dataclasses

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)}
    cfg = load_config(args.config, overrides)
    finetune(cfg, progress=not args.quiet)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from dsv3.lora.train_config import add_flags

    p = subparsers.add_parser(
        "finetune", help="LoRA fine-tuning on instruction/chat JSONL; writes a PEFT adapter",
        description="Train LoRA adapters (PEFT format) on JSONL records {instruction, input, output} or {messages}. "
                    "Settings come from --config FILE.yaml; each one is also a flag that overrides the file.")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of settings (keys as the flags, with underscores)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_flags(p)
    p.set_defaults(func=_finetune)
