"""`dsv3 finetune --config FILE.yaml`: LoRA instruction fine-tuning; every YAML key is also a flag."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def check_output(cfg, overwrite: bool) -> None:
    """output_dir must be writable, and empty unless the run resumes in it or --overwrite replaces it.

    --overwrite removes the old run's `checkpoints/` (dsv3's own files), so a later `--resume auto`
    cannot pick up a checkpoint of the run it replaced; everything else the run writes is rewritten.
    """
    from dsv3.commands.outputs import prepare_output_dir

    out = Path(cfg.output_dir)
    if cfg.resume:
        prepare_output_dir(out, overwrite=True, flag="output_dir")
        return
    prepare_output_dir(out, overwrite=overwrite, flag="output_dir", hint=" or --resume auto to continue the run in it")
    if overwrite and (out / "checkpoints").is_dir():
        shutil.rmtree(out / "checkpoints")


def _finetune(args: argparse.Namespace) -> int:
    from dsv3.commands.run import resolve_device
    from dsv3.lora.train_config import FinetuneConfig, load_config
    from dsv3.lora.trainer import finetune
    import dataclasses

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)}
    cfg = load_config(args.config, overrides)
    resolve_device(cfg.device)  # device: cuda without CUDA is one line, before anything is written
    check_output(cfg, args.overwrite)
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
    p.add_argument("--overwrite", action="store_true",
                   help="train into a non-empty output_dir, replacing the run there (its checkpoints are deleted)")
    add_flags(p)
    p.set_defaults(func=_finetune)
