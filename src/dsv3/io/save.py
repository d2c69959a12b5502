"""Saving a model in the Hugging Face checkpoint layout (the inverse of `dsv3.io.load.load_model`).

The family names the tensors (`weights().export`: DeepSeek-V3 writes stacked experts back per expert
and MTP module k as layer `num_hidden_layers + k`); here they are sharded with an index once the
weights pass `max_shard_bytes`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch

from dsv3.models.interface import CausalLM
from dsv3.models.registry import family_of

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "tiktoken.model", "chat_template.jinja")  # (tiktoken.model: Kimi-K2 / Moonlight)


def export_tensors(model: CausalLM) -> Iterator[tuple[str, Callable[[], torch.Tensor], int]]:
    """(checkpoint name, producer of the tensor, byte size) in the HF layout of the model's family."""
    return family_of(model).weights().export(model)


def remove_stale_weights(out: Path) -> None:
    """Delete the weight files an earlier save left in `out` (a re-run with `--overwrite`): a leftover
    shard index or shard would otherwise be read together with, or instead of, the new weights."""
    for f in [out / "model.safetensors", out / "model.safetensors.index.json", *out.glob("model-*-of-*.safetensors")]:
        if f.is_file() or f.is_symlink():
            f.unlink()


def save_model(model: CausalLM, out_dir: str | Path, max_shard_bytes: int = 4 * 2**30,
               tokenizer_from: str | Path | None = None) -> Path:
    """Write config.json and safetensors weights (sharded with an index past `max_shard_bytes`)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_weights(out)
    model.config.save(out)
    shards: list[list[tuple[str, callable]]] = [[]]
    size = 0
    for name, make, nbytes in export_tensors(model):
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, make))
        size += nbytes
    n = len(shards)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({name: make().detach().cpu() for name, make in shard}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name, _ in shard})
    if n > 1:
        total = sum(p.nbytes for p in model.state_dict().values())
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer_from is not None:
        copy_tokenizer_files(tokenizer_from, out)
    return out


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    for name in TOKENIZER_FILES:
        if Path(src, name).is_file():
            shutil.copy2(Path(src, name), Path(dst, name))
