"""How long a context a model handles well, and extending it with YaRN from the command line.

A checkpoint declares `max_position_embeddings`, but that is a ceiling, not a promise: the embedded
default model declares 4,096 positions and was trained on 512-token sequences (0.94 bits/byte at
a 512-token window, far worse at 2,048). So the limit a request is checked against is, in order:

1. with YaRN (`rope_scaling`): the length it was trained on (the smaller of `training_seq_len` and
   `original_max_position_embeddings`) times the YaRN factor;
2. `training_seq_len` in config.json, written by `dsv3 pretrain` (the `seq_len` it trained with),
   where it is below `max_position_embeddings`;
3. `max_position_embeddings`.

Past the limit dsv3 still runs (max_model_len is the hard bound) but logs one warning line, once
per process: when `max_model_len` is set above it, and when a prompt exceeds it.

`--rope-scaling` applies YaRN without editing config.json: the model is read from an overlay
directory (symlinks to the checkpoint's files, and a config.json with the new `rope_scaling`), so
every loader — plain, quantized, tensor-parallel ranks — sees the same configuration.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dsv3.errors import ConfigError

log = logging.getLogger("dsv3.models.context_length")
TRAINED_KEY = "training_seq_len"
YARN_KEYS = {"factor": float, "original_max_position_embeddings": int, "beta_fast": float, "beta_slow": float,
             "mscale": float, "mscale_all_dim": float}
_warned: set[str] = set()


def context_limit(cfg) -> tuple[int, str]:
    """(tokens the model handles well, the reason in words) for a `ModelConfig`."""
    trained = cfg.extra.get(TRAINED_KEY)
    trained = trained if isinstance(trained, int) and not isinstance(trained, bool) and trained > 0 else None
    rs = cfg.rope_scaling
    if rs is not None:
        base = rs.original_max_position_embeddings
        what = f"{base:,} original positions"
        if trained is not None and trained < base:
            base, what = trained, f"{trained:,} trained positions"
        n = int(base * rs.factor)
        return n, f"YaRN extends its {what} {rs.factor:g}x to {n:,}"
    if trained is not None and trained < cfg.max_position_embeddings:
        return trained, (f"it was trained on {trained:,}-token sequences; "
                         f"config.json declares {cfg.max_position_embeddings:,} positions")
    return cfg.max_position_embeddings, f"config.json declares {cfg.max_position_embeddings:,} positions"


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def check_max_model_len(cfg, max_model_len: int | None) -> None:
    """Warn (once per process) when max_model_len is set past what the model handles well."""
    limit, why = context_limit(cfg)
    if max_model_len is not None and max_model_len > limit:
        _warn_once("max_model_len", f"max_model_len {max_model_len:,} is past the {limit:,} tokens this model handles well "
                                    f"({why}); output degrades beyond that (extend it with --rope-scaling, docs/generate.md)")


def check_prompt_len(cfg, n_tokens: int) -> None:
    """Warn (once per process) when a prompt is longer than the model handles well."""
    limit, why = context_limit(cfg)
    if n_tokens > limit:
        _warn_once("prompt", f"a prompt of {n_tokens:,} tokens is past the {limit:,} tokens this model handles well "
                             f"({why}); output degrades beyond that (warned once per process)")


# ---- --rope-scaling -----------------------------------------------------------------------------
def parse_rope_scaling(text: str) -> dict[str, Any]:
    """`yarn:factor=4,original_max_position_embeddings=4096` or vLLM's JSON form -> an HF `rope_scaling` dict."""
    text = text.strip()
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--rope-scaling is not valid JSON ({e.msg})") from None
        if not isinstance(spec, dict):
            raise ConfigError("--rope-scaling JSON must be an object")
        kind = spec.pop("rope_type", None) or spec.pop("type", None)
        spec.pop("type", None)
    else:
        kind, _, rest = text.partition(":")
        spec = {}
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise ConfigError(f"--rope-scaling item {item!r} must be KEY=VALUE")
            spec[key.strip()] = value.strip()
    if kind != "yarn":
        raise ConfigError(f"--rope-scaling type {kind!r} is not supported (only yarn), e.g. "
                          "yarn:factor=4,original_max_position_embeddings=4096")
    out: dict[str, Any] = {"type": "yarn"}
    for key, value in spec.items():
        if key not in YARN_KEYS:
            raise ConfigError(f"--rope-scaling key {key!r} is unknown (known: {', '.join(YARN_KEYS)})")
        try:
            out[key] = YARN_KEYS[key](value)
            if YARN_KEYS[key] is int and float(value) != out[key]:
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"--rope-scaling {key}={value!r} must be a {YARN_KEYS[key].__name__}") from None
    if "factor" not in out:
        raise ConfigError("--rope-scaling needs factor=F (the context extension factor)")
    return out


def rope_scaled_config(raw: dict[str, Any], rope: dict[str, Any]) -> dict[str, Any]:
    """config.json content with YaRN `rope` in place of any earlier rope scaling, and room for the longer context."""
    from dsv3.config import ModelConfig

    out = {k: v for k, v in raw.items() if k != "rope_parameters"}
    rope = dict(rope)
    rope.setdefault("original_max_position_embeddings", int(raw.get("max_position_embeddings") or 4096))
    out["rope_scaling"] = rope
    out["max_position_embeddings"] = max(int(raw.get("max_position_embeddings") or 0),
                                         int(rope["original_max_position_embeddings"] * rope["factor"]))
    if isinstance(raw.get("rope_parameters"), dict) and "rope_theta" in raw["rope_parameters"]:
        out.setdefault("rope_theta", raw["rope_parameters"]["rope_theta"])
    ModelConfig.from_dict(out)  # a bad factor or length fails here, naming the field
    return out


def with_rope_scaling(model_dir: str | Path, rope: dict[str, Any]) -> Path:
    """An overlay of `model_dir` whose config.json carries `rope` (removed when the process exits)."""
    src = Path(model_dir).resolve()
    return _overlay(src, rope_scaled_config(_read_config(src, "--rope-scaling"), rope))


def with_max_position(model_dir: str | Path, max_position_embeddings: int) -> Path:
    """An overlay of `model_dir` that admits `max_position_embeddings` positions, rotary and YaRN unchanged: to
    measure what a longer context costs (time, memory) without retraining or rescaling the model."""
    src = Path(model_dir).resolve()
    raw = _read_config(src, "a longer context")
    return _overlay(src, {**raw, "max_position_embeddings": max(int(raw.get("max_position_embeddings") or 0),
                                                                max_position_embeddings)})


def _read_config(src: Path, why: str) -> dict[str, Any]:
    try:
        return json.loads((src / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {src / 'config.json'} to apply {why} ({e})") from None


def _overlay(src: Path, config: dict[str, Any]) -> Path:
    """A temporary directory of links to `src`'s files with `config` as its config.json (removed at exit)."""
    root = Path(tempfile.mkdtemp(prefix="dsv3-config-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    overlay = root / src.name
    overlay.mkdir()
    for entry in src.iterdir():
        if entry.name != "config.json":
            (overlay / entry.name).symlink_to(entry)
    (overlay / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return overlay
