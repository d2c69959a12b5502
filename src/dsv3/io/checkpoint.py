"""Loading and saving Hugging Face-layout checkpoints (single file or sharded safetensors).

Loading builds the model on the meta device, allocates it once in the target dtype and copies
each tensor straight from the memory-mapped file, so peak memory stays near the model's own size.
FP8 e4m3 weights with 128×128 `weight_scale_inv` blocks are dequantized on the way in; a scale is
found through the index's weight map (`TensorIndex`), since the released files split some weight/scale
pairs across shards (deepseek-ai/DeepSeek-V3 PR #2). Per-expert
checkpoint tensors are written into the stacked expert weights, and layer `num_hidden_layers + k`
into MTP module k. Pickle formats are refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from dsv3.config import ModelConfig
from dsv3.errors import CheckpointError
from dsv3.models.registry import family
from dsv3.io.save import TOKENIZER_FILES, copy_tokenizer_files, export_tensors, save_model
from dsv3.io.safetensors import SafetensorsFile

__all__ = ["TOKENIZER_FILES", "TensorIndex", "checkpoint_files", "copy_tokenizer_files", "dequantize_fp8", "export_tensors", "iter_checkpoint",
           "load_plain", "map_name", "read_tensor", "resolve_dtype", "save_model"]

_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.weight_scale_inv)$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def map_name(name: str, cfg: ModelConfig, with_mtp: bool):
    """Checkpoint tensor name -> (model parameter name, index) by the config's model family, or None to skip it."""
    return family(cfg.model_type).weights().map_name(name, cfg, with_mtp)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, through the index when sharded."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise CheckpointError(f"{index} is not a valid safetensors index (no 'weight_map')") from None
        files = sorted({model_dir / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"shard {f.name} listed in {index.name} is missing from {model_dir}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(f"{model_dir} only has pickle weights ({pickles[0]}); pickle is refused because loading it can run code — convert to safetensors")
    raise CheckpointError(f"no *.safetensors weights in {model_dir}")


class TensorIndex:
    """Which file of a checkpoint holds each tensor: the index's `weight_map` (every file's header without an
    index), so a tensor is read from wherever the shards put it. Files other than the one being walked are
    opened on first use and kept open until `close`."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.where: dict[str, Path] = {}
        index = files[0].parent / "model.safetensors.index.json" if files else None
        if index is not None and index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.where = {name: files[0].parent / f for name, f in weight_map.items()}
        else:
            for path in files:
                with SafetensorsFile(path) as sf:
                    self.where.update(dict.fromkeys(sf.entries, path))
        self._open: dict[Path, SafetensorsFile] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, current: SafetensorsFile | None = None) -> tuple[SafetensorsFile, torch.Tensor]:
        """(the open file holding `name`, a view of the tensor): `current` when it has it, else the file the index names."""
        if current is not None and name in current.entries:
            return current, current.get(name)
        path = self.where.get(name)
        if path is None:
            raise CheckpointError(f"tensor {name!r} is in none of the checkpoint's files")
        if path not in self._open:
            self._open[path] = SafetensorsFile(path)
        sf = self._open[path]
        if name not in sf.entries:
            raise CheckpointError(f"{path.name}: the index lists {name!r} in this file, which does not hold it")
        return sf, sf.get(name)

    def close(self) -> None:
        for sf in self._open.values():
            sf.close()
        self._open.clear()

    def __enter__(self) -> "TensorIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fp8_scale(sf: SafetensorsFile, name: str, index: "TensorIndex | None") -> tuple[SafetensorsFile, torch.Tensor]:
    """(file, view) of the `weight_scale_inv` of FP8 weight `name`: in its own file, or wherever the index puts it."""
    scale = name.removesuffix("weight") + "weight_scale_inv"
    if scale in sf.entries or index is None or scale not in index:
        if scale not in sf.entries:
            raise CheckpointError(f"{sf.path.name}: FP8 tensor {name!r} has no {scale!r}")
        return sf, sf.get(scale)
    return index.get(scale)


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str) -> torch.Tensor:
    """W[n, k] = fp32(Wq[n, k]) · S[n // bn, k // bk]; edge blocks smaller than the block use their block's scale."""
    (N, K), (bn, bk) = w.shape, block
    grid = (-(-N // bn), -(-K // bk))
    if tuple(scale_inv.shape) != grid:
        raise CheckpointError(f"tensor {name!r}: weight_scale_inv shape {list(scale_inv.shape)} does not match the {bn}×{bk} block grid {list(grid)}")
    s = scale_inv.float().repeat_interleave(bn, 0)[:N].repeat_interleave(bk, 1)[:, :K]
    return w.float() * s


def has_mtp_weights(files: list[Path], cfg: ModelConfig) -> bool:
    """Whether the checkpoint stores the MTP modules (HF's save_pretrained drops them, for one)."""
    key = family(cfg.model_type).weights().mtp_probe(cfg)
    for path in files:
        with SafetensorsFile(path) as sf:
            if key in sf.entries:
                return True
    return False


def iter_checkpoint(files: list[Path], cfg: ModelConfig, with_mtp: bool, targets: dict, desc: str = "loading",
                    progress: bool = True, index: TensorIndex | None = None,
                    claim: Callable[[SafetensorsFile, str], bool] | None = None) -> Iterator[tuple[SafetensorsFile, str, str, tuple]]:
    """(open file, checkpoint name, model parameter name, index) for every tensor the model takes from `files`.

    Skips FP8 scales (read with their weight), MTP copies of shared tensors, a tied head and HF's
    cached rotary tables; an unknown tensor is an error (the config does not match the checkpoint).
    `claim(sf, name)` -> True takes a tensor out of the walk first (the packed tensors of quantized modules).
    """
    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc=desc, disable=not progress)
    for path in files:
        with SafetensorsFile(path) as sf:
            for name in sf.keys():
                bar.update(sf.entries[name][3] - sf.entries[name][2])
                if claim is not None and claim(sf, name):
                    continue
                if name.endswith("weight_scale_inv"):
                    if name.removesuffix("_scale_inv") not in sf.entries and (index is None or name.removesuffix("_scale_inv") not in index):
                        raise CheckpointError(f"{path.name}: {name!r} has no matching weight in the checkpoint")
                    continue
                if _IGNORED.search(name):
                    continue
                target = map_name(name, cfg, with_mtp)
                if target is None or (target[0] == "lm_head.weight" and cfg.tie_word_embeddings):
                    continue
                if target[0] not in targets:
                    raise CheckpointError(f"{path.name}: unexpected tensor {name!r} (does config.json match this checkpoint?)")
                yield sf, name, target[0], target[1]
    bar.close()


def read_tensor(sf: SafetensorsFile, name: str, cfg: ModelConfig, index: TensorIndex | None = None) -> torch.Tensor:
    """A tensor as stored, or dequantized to fp32 when it is an FP8 block-scaled weight (its scale looked up
    through `index` when another shard holds it; a family whose checkpoints store other formats reads them with
    its weights module's own `read_tensor`)."""
    own = getattr(family(cfg.model_type).weights(), "read_tensor", None)
    if own is not None:
        return own(sf, name, cfg)
    src = sf.get(name)
    if src.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        holder, scale = fp8_scale(sf, name, index)
        block = tuple((cfg.quantization_config or {}).get("weight_block_size") or (128, 128))
        src = dequantize_fp8(src, scale, block, name)
        holder.release(name.removesuffix("weight") + "weight_scale_inv")
    return src


def load_plain(model_dir: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
               with_mtp: bool | None = None, progress: bool = True) -> nn.Module:
    """Load a full-precision (or FP8, dequantized) checkpoint directory into its family's causal LM, in eval mode.

    with_mtp: True loads the MTP modules (an error if absent), False skips them, None loads them if present.
    """
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    dtype = resolve_dtype(dtype, cfg, device)
    files = checkpoint_files(model_dir)
    if cfg.num_nextn_predict_layers == 0:
        with_mtp = False
    elif with_mtp is None:
        with_mtp = has_mtp_weights(files, cfg)
    with torch.device("meta"):
        model = family(cfg.model_type).model_class()(cfg, with_mtp=with_mtp)
    model.to_empty(device=device)
    model.tie_weights()
    model.cast(dtype)
    model.reset_buffers()
    targets = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    needed = {n for n, t in targets.items() if n in model.state_dict()}
    if cfg.tie_word_embeddings:
        needed.discard("lm_head.weight")
    filled: dict[str, int] = {}
    pieces = family(cfg.model_type).weights().pieces
    with TensorIndex(files) as where:
        for sf, name, pname, index in iter_checkpoint(files, cfg, with_mtp, targets, "loading", progress, where):
            dest = targets[pname][index] if index else targets[pname]
            src = read_tensor(sf, name, cfg, where)
            if tuple(src.shape) != tuple(dest.shape):
                raise CheckpointError(f"{sf.path.name}: tensor {name!r} has shape {list(src.shape)}, the model expects {list(dest.shape)}")
            with torch.no_grad():
                dest.copy_(src)
            del src
            sf.release(name)
            filled[pname] = filled.get(pname, 0) + (1 if index else pieces(pname, cfg))  # a whole tensor fills it at once
    expected_counts = {n: family(cfg.model_type).weights().pieces(n, cfg) for n in needed}
    for n in sorted(needed):
        if filled.get(n, 0) < expected_counts[n]:
            raise CheckpointError(f"tensor for {n!r} is missing from the checkpoint in {model_dir}")
    return model.eval()


def resolve_dtype(dtype: torch.dtype | str | None, cfg: ModelConfig, device: str | torch.device | None = None) -> torch.dtype:
    """'auto'/None -> the checkpoint's dtype (bf16 for FP8 checkpoints), except fp32 when computing on a CPU
    (`device` "cpu": bf16 matmuls are emulated on most CPUs and run several times slower). Names like 'bf16' accepted."""
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device is not None and torch.device(device).type == "cpu":
            return torch.float32
        return names.get(str(cfg.torch_dtype), torch.bfloat16)
    if dtype not in names:
        raise CheckpointError(f"unknown dtype {dtype!r} (use auto, fp32, bf16 or fp16)")
    return names[dtype]
