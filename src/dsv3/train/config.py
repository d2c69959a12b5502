"""`PretrainConfig`: every knob of `dsv3 pretrain`, read from YAML and overridable per key.

The model shape is an HF-style `config.json` dict under `model:` (so the saved model needs no
translation); the training knobs sit at the top level. Values given on the command line are
parsed as YAML scalars, so `--lr 1e-3`, `--compile true` and `--mtp_lambda "[[0,0.3],[800,0.1]]"`
all work, and every value is type-checked here, before anything slow starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dsv3.errors import DSV3Error


class PretrainConfigError(DSV3Error):
    """A pretraining config file or override is missing, malformed, or out of range."""


@dataclass
class PretrainConfig:
    """Training hyper-parameters; see docs/pretrain.md for what each one does."""

    model: dict[str, Any] = field(default_factory=dict)
    data: str = ""                      # shard directory written by `dsv3 data build`
    mix: list = field(default_factory=list)  # [[shard dir, share of each batch's rows], ...] read beside `data`
    init_from: str | None = None        # model directory (HF layout) to start from: continued pretraining
    tokenizer: str | None = None        # default: the tokenizer recorded in the shard manifest
    out: str = "runs/pretrain"
    seed: int = 0
    seq_len: int = 256
    batch_size: int = 8                 # sequences per micro-batch
    grad_accum: int = 1                 # micro-batches per optimizer step
    max_steps: int = 1000               # length of the schedule
    stop_after: int | None = None       # leave this invocation after N more steps (checkpointed)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0              # 0 disables clipping
    mtp_lambda: float | list = 0.3      # constant or [[step, value], ...]
    bias_update_rate: float = 1e-3      # γ of aux-loss-free balancing; 0 disables it
    seq_aux_alpha: float = 0.0          # α of the sequence-wise balance loss; 0 disables it
    fim_rate: float = 0.5
    doc_mask: bool = True               # attention and positions per packed document; false: each window one sequence
    fim_level: str = "document"         # document: FIM whole files before packing | context: each file piece of a window
                                        # | line: as context, cut at lines of the text, parts tokenized apart
    init_std: float | None = None       # default: model.initializer_range
    kv_norm_init: float = 1.0           # deepseek_v4: initial gain of the K=V norms, which caps the attention logits
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    compile: bool = False
    threads: int | None = None          # torch CPU threads
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    export_every: int = 0               # also write OUT/step-N/, a model directory like final/, every N steps (0: off)
    eval_every: int = 100
    eval_batches: int = 16
    log_every: int = 1
    save_dtype: str = "float32"         # dtype of the final model: float32 | bfloat16
    head_dtype: str = "float32"         # LM-head matmuls: float32 | bfloat16 | auto (bf16 where native: AMX, GPU)
    resume: bool = True                 # continue from OUT/checkpoints if one is there
    progress: bool = True

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None, overrides: dict[str, str] | None = None) -> "PretrainConfig":
        raw: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise PretrainConfigError(f"config file {p} does not exist.")
            try:
                raw = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as e:
                raise PretrainConfigError(f"config file {p} is not valid YAML ({str(e).splitlines()[0]}).") from None
            if not isinstance(raw, dict):
                raise PretrainConfigError(f"config file {p} must be a mapping of keys to values.")
        raw = dict(raw)
        raw["model"] = dict(raw.get("model") or {})
        for key, text in (overrides or {}).items():
            value = _scalar(key, text)
            if key.startswith("model."):
                raw["model"][key[len("model."):]] = value
            else:
                raw[key] = value
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "PretrainConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in fields:
                raise PretrainConfigError(f"unknown pretraining key {key!r}.")
        cfg = cls(**{k: _check(k, v, fields[k].type) for k, v in raw.items()})
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if not self.data:
            raise PretrainConfigError("the pretraining config has no `data` (a shard directory from `dsv3 data build`).")
        if not isinstance(self.model, dict) or not (self.model or self.init_from):
            raise PretrainConfigError("the pretraining config has no `model` mapping (an HF-style config.json dict) "
                                      "and no `init_from` model directory.")
        if self.fim_level not in ("document", "context", "line"):
            raise PretrainConfigError(f"fim_level {self.fim_level!r} must be document, context or line.")
        for key in ("seq_len", "batch_size", "grad_accum", "max_steps", "ckpt_every", "eval_every",
                    "eval_batches", "log_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise PretrainConfigError(f"{key} {getattr(self, key)} must be a positive integer.")
        if self.export_every < 0:
            raise PretrainConfigError(f"export_every {self.export_every} must be 0 (off) or a positive number of steps.")
        for key in ("lr", "weight_decay", "grad_clip", "bias_update_rate", "seq_aux_alpha", "warmup_steps"):
            if getattr(self, key) < 0:
                raise PretrainConfigError(f"{key} {getattr(self, key)} must not be negative.")
        for key in ("fim_rate", "min_lr_ratio", "beta1", "beta2"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise PretrainConfigError(f"{key} {getattr(self, key)} must be in [0, 1].")
        if not self.kv_norm_init > 0:
            raise PretrainConfigError(f"kv_norm_init {self.kv_norm_init} must be positive.")
        if self.stop_after is not None and self.stop_after < 1:
            raise PretrainConfigError(f"stop_after {self.stop_after} must be a positive integer.")
        if self.save_dtype not in ("float32", "bfloat16"):
            raise PretrainConfigError(f"save_dtype {self.save_dtype!r} must be float32 or bfloat16.")
        if self.head_dtype not in ("float32", "bfloat16", "auto"):
            raise PretrainConfigError(f"head_dtype {self.head_dtype!r} must be float32, bfloat16 or auto.")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise PretrainConfigError(f"device {self.device!r} must be auto, cpu, cuda or cuda:N.")
        if not isinstance(self.mtp_lambda, (int, float)):
            ok = isinstance(self.mtp_lambda, list) and self.mtp_lambda and all(
                isinstance(e, list) and len(e) == 2 and all(isinstance(x, (int, float)) for x in e) for e in self.mtp_lambda)
            if not ok:
                raise PretrainConfigError("mtp_lambda must be a number or a list of [step, value] pairs.")
        self.mix_rows()

    def mix_rows(self) -> list[tuple[str, int]]:
        """[(shard dir, rows per micro-batch)] of `mix`; `data` keeps the remaining rows (at least one)."""
        out = []
        for entry in self.mix:
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                    and isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool) and 0 < entry[1] < 1):
                raise PretrainConfigError(f"mix entry {entry!r} must be [shard directory, share] with 0 < share < 1.")
            rows = round(entry[1] * self.batch_size)
            if rows < 1:
                raise PretrainConfigError(f"mix share {entry[1]} of batch_size {self.batch_size} rounds to no rows.")
            out.append((entry[0], rows))
        if sum(r for _, r in out) >= self.batch_size:
            raise PretrainConfigError(f"mix takes {sum(r for _, r in out)} of {self.batch_size} rows per batch; "
                                      f"`data` needs at least one.")
        return out


def _scalar(key: str, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise PretrainConfigError(f"--{key} value {text!r} is not a valid YAML scalar.") from None


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check(key: str, value: Any, annotation: str) -> Any:
    """Accept `value` if it fits the field's annotation (a string, as `from __future__` leaves it)."""
    options = [t.strip() for t in str(annotation).split("|")]
    if value is None and "None" in options:
        return None
    if isinstance(value, str) and "float" in options:  # YAML 1.1 reads `1e-3` (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    for opt in options:
        base = opt.split("[")[0]
        if base in _TYPES and isinstance(value, _TYPES[base]) and not (base != "bool" and isinstance(value, bool)):
            return float(value) if base == "float" else value
        if base == "list" and isinstance(value, list) or base == "dict" and isinstance(value, dict):
            return value
    raise PretrainConfigError(f"{key} {value!r} should be of type {annotation}.")
