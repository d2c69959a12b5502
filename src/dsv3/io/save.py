"""Saving a model in the Hugging Face checkpoint layout (the inverse of `dsv3.io.checkpoint.load_model`).

Stacked experts are written back per expert and MTP module k as layer `num_hidden_layers + k`
(with copies of the shared embedding and head, as DeepSeek's files have), sharded with an index
once the weights pass `max_shard_bytes`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Iterator

from dsv3.models.deepseek_v3 import DeepseekV3ForCausalLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def export_tensors(model: DeepseekV3ForCausalLM) -> Iterator[tuple[str, callable, int]]:
    """(checkpoint name, producer of the tensor, byte size) in HF layout: experts split, MTP as layer L+k."""
    cfg, L = model.config, model.config.num_hidden_layers
    Im = cfg.moe_intermediate_size
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        out = name
        m = re.match(r"^model\.mtp\.(\d+)\.(block\.)?(.*)$", name)
        if m:
            out = f"model.layers.{L + int(m.group(1))}.{m.group(3)}"
        if out.endswith("experts.gate_up_proj") or out.endswith("experts.down_proj"):
            base, proj = out.rsplit(".", 1)
            for j in range(t.shape[0]):
                if proj == "down_proj":
                    yield f"{base}.{j}.down_proj.weight", (lambda t=t, j=j: t[j].contiguous()), t[j].nbytes
                else:
                    yield f"{base}.{j}.gate_proj.weight", (lambda t=t, j=j: t[j, :Im].contiguous()), t[j].nbytes // 2
                    yield f"{base}.{j}.up_proj.weight", (lambda t=t, j=j: t[j, Im:].contiguous()), t[j].nbytes // 2
        else:
            yield out, (lambda t=t: t.contiguous()), t.nbytes
    for k in range(len(model.model.mtp)):  # copies of the shared embedding and head, as the official files have
        yield f"model.layers.{L + k}.embed_tokens.weight", (lambda: model.model.embed_tokens.weight.clone()), model.model.embed_tokens.weight.nbytes
        yield f"model.layers.{L + k}.shared_head.head.weight", (lambda: model.lm_head.weight.clone()), model.lm_head.weight.nbytes


def remove_stale_weights(out: Path) -> None:
    """Delete the weight files an earlier save left in `out` (a re-run with `--overwrite`): a leftover
    shard index or shard would otherwise be read together with, or instead of, the new weights."""
    for f in [out / "model.safetensors", out / "model.safetensors.index.json", *out.glob("model-*-of-*.safetensors")]:
        if f.is_file() or f.is_symlink():
            f.unlink()


def save_model(model: DeepseekV3ForCausalLM, out_dir: str | Path, max_shard_bytes: int = 4 * 2**30,
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
