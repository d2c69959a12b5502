"""Token windows for the quantization table: held-out text to score, training text to calibrate AWQ on.

A model trained by `dsv3 pretrain` knows its split only through the shard directory it trained on,
so windows come from that directory's `manifest.json` and token shards: the `heldout` split for
scoring (files the model never saw) and the `train` split for AWQ calibration. Windows are spread
evenly over the split's token stream (deterministic, covering every part of it rather than its
first files). The shards must have been tokenized by the model's own tokenizer (checked by hash).
For a model without shards (the random bench model) text files are tokenized instead.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import yaml

from dsv3.data.shards import TokenShards, load_manifest
from dsv3.errors import DSV3Error


class BenchDataError(DSV3Error):
    """The held-out / calibration data for a benchmark cannot be found or does not fit the model."""


def shards_of(model_dir: Path) -> Path | None:
    """The shard directory the model's `pretrain.yaml` names, if it still exists."""
    cfg = Path(model_dir) / "pretrain.yaml"
    if not cfg.is_file():
        return None
    data = (yaml.safe_load(cfg.read_text()) or {}).get("data")
    return Path(data) if data and (Path(data) / "manifest.json").is_file() else None


def check_tokenizer(shards: Path, model_dir: Path) -> None:
    want = load_manifest(shards)["tokenizer"].get("sha256")
    got = hashlib.sha256((Path(model_dir) / "tokenizer.json").read_bytes()).hexdigest()
    if want != got:
        raise BenchDataError(f"{shards} was tokenized with another tokenizer than {model_dir}/tokenizer.json "
                             f"(sha256 {str(want)[:12]}… vs {got[:12]}…); pass the shards the model trained on")


def shard_windows(shards: Path, split: str, n: int, length: int) -> torch.Tensor:
    """[n, length] token windows spread evenly over one split; n ≤ 0 (or more than fit): all of it, back to back."""
    stream = TokenShards(shards, split)
    if len(stream) < length:
        raise BenchDataError(f"the {split} split of {shards} has {len(stream)} tokens, fewer than one {length}-token window")
    if n <= 0 or n >= len(stream) // length:
        starts = np.arange(0, len(stream) - length + 1, length)
    else:
        starts = np.linspace(0, len(stream) - length, n).astype(np.int64)
    return torch.from_numpy(np.stack([stream.window(int(s), length) for s in starts]))


def text_windows(tok, text: str, n: int, length: int) -> torch.Tensor:
    """[n, length] consecutive windows of a tokenized text."""
    ids = tok.encode(text, add_special_tokens=False)
    n = min(n, len(ids) // length)
    if n == 0:
        raise BenchDataError(f"the text has {len(ids)} tokens, fewer than one {length}-token window")
    return torch.tensor(ids[: n * length]).view(n, length)
