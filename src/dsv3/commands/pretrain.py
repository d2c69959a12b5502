"""`dsv3 pretrain --config FILE.yaml [--key value ...]`: pretrain a DeepSeek-V3 model on token shards."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from dsv3.config import ModelConfig
from dsv3.train.config import PretrainConfig

_SKIP_MODEL_FIELDS = ("extra",)


def _run(args: argparse.Namespace) -> int:
    from dsv3.commands.outputs import prepare_output_dir
    from dsv3.commands.run import resolve_device
    from dsv3.train.pretrain import pretrain

    overrides = {k: v for k, v in vars(args).get("overrides", {}).items() if v is not None}
    cfg = PretrainConfig.load(args.config, overrides)
    resolve_device(cfg.device)  # device: cuda without CUDA is one line, before anything is written
    prepare_output_dir(cfg.out, overwrite=True, flag="out")  # a re-run resumes there (resume: true); it must be writable
    s = pretrain(cfg)
    held = f", held-out loss {s['heldout_loss']:.4f}" if s.get("heldout_loss") is not None else ""
    train = f"train loss {s['loss']:.4f}" if "loss" in s else "nothing left to train"
    where = f"model in {s['final']}" if s["final"] else f"resume from {s['checkpoint']} by running the same command"
    print(f"{cfg.out}: step {s.get('step', s['start_step'])}/{cfg.max_steps}, {train}{held}; {where}", file=sys.stderr)
    return 0


class _Override(argparse.Action):
    """Collect `--key value` into args.overrides[key] (the text; the config parses it as YAML)."""

    def __call__(self, parser, namespace, values, option_string=None):
        store = dict(getattr(namespace, "overrides", None) or {})
        store[self.dest] = values
        namespace.overrides = store


def _spellings(key: str, prefix: str = "") -> list[str]:
    """`--max-steps` as every other dsv3 flag is spelled, and `--max_steps` as the YAML key is."""
    return list(dict.fromkeys([f"--{prefix}{key.replace('_', '-')}", f"--{prefix}{key}"]))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain", help="pretrain a DeepSeek-V3 model (MTP, aux-loss-free balancing, FIM, packing)",
        description="Pretrain on shards from `dsv3 data build`. Every config key can be overridden as "
                    "--KEY VALUE (VALUE is read as YAML; --max-steps or --max_steps), model keys as --model.KEY VALUE.")
    p.add_argument("--config", metavar="FILE.yaml", default=None, help="training config (see configs/pretrain-tiny.yaml)")
    for f in dataclasses.fields(PretrainConfig):
        if f.name != "model":
            p.add_argument(*_spellings(f.name), dest=f.name, action=_Override, metavar="VALUE", default=None,
                           help=argparse.SUPPRESS)
    for f in dataclasses.fields(ModelConfig):
        if f.name not in _SKIP_MODEL_FIELDS:
            p.add_argument(*_spellings(f.name, "model."), dest=f"model.{f.name}", action=_Override, metavar="VALUE",
                           default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_run, overrides={})
