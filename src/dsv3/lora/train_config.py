"""`dsv3 finetune` settings: one dataclass, read from YAML, every key also a command-line flag.

Defaults follow the fine-tuning request (lr 2e-5, batch 32, rank 64, 10 % warm-up, cosine decay).
`batch_size` counts rows (packed sequences with packing on) per optimizer step, or, with
`batch_unit: examples`, examples (packed into as few rows as they fill); it is reached by gradient
accumulation over `micro_batch_size` rows, so a small machine trains the same recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dsv3.errors import DSV3Error
from dsv3.lora.apply import DEFAULT_TARGETS, LoRASpec


class FinetuneConfigError(DSV3Error):
    """A fine-tuning setting is unknown, of the wrong type or out of range."""


@dataclass
class FinetuneConfig:
    model: str | None = None                   # base model directory (None: the embedded default model)
    data_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    eval_split: float = 0.0                    # fraction of the training examples held out for eval
    template: str = "chat"                     # "chat" (the model's chat template) or "alpaca"
    max_seq_len: int = 2048
    packing: bool = True
    on_bad_example: str = "skip"               # "skip" (reported) or "error"
    learning_rate: float = 2e-5
    batch_size: int = 32
    batch_unit: str = "rows"                   # what batch_size counts: "rows" (packed rows) or "examples"
    micro_batch_size: int = 4
    lora_rank: int = 64
    lora_alpha: float | None = None            # None: 2 * lora_rank
    lora_dropout: float = 0.0
    use_rslora: bool = False
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    routed_experts: bool = False
    quantization: str = "none"                 # QLoRA: "int8" or "int4" quantizes the frozen base (weight-only)
    group_size: int = 128                      # int4: input channels per scale/zero-point group
    train_steps: int = 0                       # 0: derive from epochs
    epochs: float = 1.0
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 0                        # 0: evaluate at the end only
    checkpoint_every: int = 0                  # 0: no intermediate checkpoints
    resume: str | None = None                  # a checkpoint directory, or "auto" for the latest in output_dir
    output_dir: str = "finetune-out"
    device: str = "auto"
    bf16: bool = True                          # bf16 autocast on GPU (ignored on CPU, which trains in fp32)
    plot: bool = True

    def lora_spec(self) -> LoRASpec:
        return LoRASpec(r=self.lora_rank, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                        use_rslora=self.use_rslora, target_modules=list(self.target_modules),
                        routed_experts=self.routed_experts)

    def check(self) -> None:
        positive = ("max_seq_len", "batch_size", "micro_batch_size", "lora_rank")
        for name in positive:
            if getattr(self, name) < 1:
                raise FinetuneConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("learning_rate", "epochs"):
            if getattr(self, name) <= 0:
                raise FinetuneConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("train_steps", "eval_every", "checkpoint_every", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise FinetuneConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("eval_split", "warmup_ratio", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise FinetuneConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.batch_unit not in ("rows", "examples"):
            raise FinetuneConfigError(f"batch_unit must be 'rows' or 'examples', got {self.batch_unit!r}")
        if self.batch_unit == "rows" and self.batch_size % self.micro_batch_size:
            raise FinetuneConfigError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}")
        if self.template not in ("chat", "alpaca"):
            raise FinetuneConfigError(f"template must be 'chat' or 'alpaca', got {self.template!r}")
        if self.quantization not in ("none", "int8", "int4"):
            raise FinetuneConfigError(f"quantization must be none, int8 or int4, got {self.quantization!r}")
        if self.quantization == "int4":
            from dsv3.quant.schemes import check_group_size

            try:
                check_group_size(self.group_size)
            except DSV3Error as e:
                raise FinetuneConfigError(f"group_size: {e}") from None
        if self.quantization != "none" and self.routed_experts:
            raise FinetuneConfigError("routed_experts adapters need full-precision experts; use quantization: none")
        self.lora_spec().check()


def _field_type(f: dataclasses.Field) -> str:
    return str(f.type).replace(" ", "")


def _coerce(name: str, kind: str, value: Any) -> Any:
    if value is None and "None" in kind:
        return None
    try:
        if kind.startswith("list"):
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, (str, Path)) for v in value):
                raise TypeError
            return [str(v) for v in value]
        if kind.startswith("bool"):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind.startswith("int"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError
            return value
        if kind.startswith("float"):
            if isinstance(value, str):  # YAML 1.1 reads `2e-5` (no dot) as a string; the request writes it so
                try:
                    value = float(value)
                except ValueError:
                    raise TypeError from None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError
            if not math.isfinite(value):
                raise FinetuneConfigError(f"setting {name!r} must be a finite number, got {value!r}")
            return float(value)
        if not isinstance(value, str):
            raise TypeError
        return value
    except TypeError:
        raise FinetuneConfigError(f"setting {name!r} must be of type {kind.replace('|None', ' or null')}, got {value!r}") from None


def load_config(path: str | Path | None, overrides: dict[str, Any]) -> FinetuneConfig:
    """YAML file (optional) then command-line overrides (non-None values) -> checked config."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FinetuneConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise FinetuneConfigError(f"config file {p} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise FinetuneConfigError(f"config file {p} must hold a mapping of settings")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    fields = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise FinetuneConfigError(f"unknown setting {unknown[0]!r} (see `dsv3 finetune --help`)")
    cfg = FinetuneConfig(**{k: _coerce(k, _field_type(fields[k]), v) for k, v in values.items()})
    cfg.check()
    return cfg


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One `--key` flag per setting; unset flags stay None so the YAML value (or default) wins."""
    for f in dataclasses.fields(FinetuneConfig):
        kind = _field_type(f)
        flag = "--" + f.name.replace("_", "-")
        if kind.startswith("bool"):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif kind.startswith("list"):
            parser.add_argument(flag, dest=f.name, nargs="+", default=None, metavar="X")
        else:
            typ = int if kind.startswith("int") else float if kind.startswith("float") else str
            parser.add_argument(flag, dest=f.name, type=typ, default=None, metavar=f.name.upper())
