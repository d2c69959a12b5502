"""Sharded loading: every rank reads only its slices of the safetensors files.

The model is built on the meta device, parallelized (local shapes), allocated once, and each
checkpoint tensor is narrowed to this rank's slice while still a view of the memory map, so a
rank touches (and keeps) only the pages it needs; expert tensors of other ranks are never read.
FP8 slices are dequantized over the 128×128 scale blocks covering them only.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

from dsv3.io.checkpoint import TensorIndex, checkpoint_files, dequantize_fp8, fp8_scale, has_mtp_weights, iter_checkpoint, resolve_dtype
from dsv3.config import ModelConfig
from dsv3.errors import CheckpointError
from dsv3.models.interface import CausalLM
from dsv3.models.registry import family
from dsv3.parallel.dist import ParallelConfig, ParallelError
from dsv3.parallel.shard import localize, owners, parallelize, pieces


def narrow_fp8(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], cut: tuple[int, int, int] | None,
               name: str) -> torch.Tensor:
    """Dequantize only the scale blocks covering `cut` = (dim, start, end) of an FP8 weight, then cut."""
    if cut is None:
        return dequantize_fp8(w, scale, block, name)
    dim, start, end = cut
    b = block[dim]
    b0, b1 = start // b, -(-end // b)
    lo = b0 * b
    sub = w.narrow(dim, lo, min(w.shape[dim], b1 * b) - lo)
    full = dequantize_fp8(sub, scale.narrow(dim, b0, b1 - b0), block, name)
    return full.narrow(dim, start - lo, end - start)


def build_local_model(cfg: ModelConfig, pc: ParallelConfig, dtype: torch.dtype, device: torch.device | str,
                      with_mtp: bool) -> torch.nn.Module:
    """This rank's model, allocated (uninitialised) with local shapes (its family's parallel layout)."""
    with torch.device("meta"):
        model = parallelize(family(cfg.model_type).model_class()(cfg, with_mtp=with_mtp), pc)
    model.to_empty(device=device)
    model.tie_weights()
    model.cast(dtype)
    model.reset_buffers()
    return model


def load_sharded(model_dir: str | Path, pc: ParallelConfig, dtype: torch.dtype | str | None = None,
                 device: str | torch.device = "cpu", with_mtp: bool | None = None,
                 progress: bool = True) -> CausalLM:
    """Load rank `pc.rank`'s part of a checkpoint (eval mode); same arguments as `dsv3.io.load.load_model`."""
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    qc = cfg.quantization_config or {}
    if qc and qc.get("quant_method") != "fp8":
        raise ParallelError(f"{model_dir}: parallel loading reads bf16/fp32 and DeepSeek FP8 checkpoints, not "
                            f"quant_method {qc.get('quant_method')!r}")
    dtype = resolve_dtype(dtype, cfg)
    files = checkpoint_files(model_dir)
    if cfg.num_nextn_predict_layers == 0:
        with_mtp = False
    elif with_mtp is None:
        with_mtp = has_mtp_weights(files, cfg)
    model = build_local_model(cfg, pc, dtype, device, with_mtp)
    targets = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    own = owners(model)
    needed = {n for n in targets if n in model.state_dict()}
    if cfg.tie_word_embeddings:
        needed.discard("lm_head.weight")
    filled: dict[str, int] = {}
    block = tuple(qc.get("weight_block_size") or (128, 128))
    for sf, name, pname, index in iter_checkpoint(files, cfg, with_mtp, targets, f"loading rank {pc.rank}", progress):
        placed = localize(pname, index, own.get(pname))
        if placed is None:
            continue  # another rank's expert: never read
        dest_index, cut = placed
        dest = targets[pname][dest_index] if dest_index else targets[pname]
        src = sf.get(name)
        if src.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # dequantize only this rank's blocks
            scale = name.removesuffix("weight") + "weight_scale_inv"
            if scale not in sf.entries:
                raise CheckpointError(f"{sf.path.name}: FP8 tensor {name!r} has no {scale!r}")
            src = narrow_fp8(src, sf.get(scale), block, cut, name)
            sf.release(scale)
        elif cut is not None:
            if cut[2] > src.shape[cut[0]]:
                raise CheckpointError(f"{sf.path.name}: tensor {name!r} has shape {list(src.shape)}, too small for this config")
            src = src.narrow(cut[0], cut[1], cut[2] - cut[1])
        if tuple(src.shape) != tuple(dest.shape):
            raise CheckpointError(f"{sf.path.name}: tensor {name!r} has shape {list(src.shape)} after sharding, "
                                  f"the model expects {list(dest.shape)}")
        with torch.no_grad():
            dest.copy_(src)
        del src
        sf.release(name)
        filled[pname] = filled.get(pname, 0) + 1
    for n in sorted(needed):
        if filled.get(n, 0) < pieces(own.get(n), n, cfg):
            raise CheckpointError(f"tensor for {n!r} is missing from the checkpoint in {model_dir}")
    return model.eval()


def rss(field: str = "VmRSS") -> int:
    """Resident bytes now (VmRSS) or at peak (VmHWM) from /proc; ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def memory_report(model: CausalLM, rank: int, baseline: int = 0) -> str:
    """One line: this rank's weight bytes and peak memory (CUDA allocator on GPU, peak RSS above `baseline` on CPU)."""
    weights = sum(t.nbytes for t in model.state_dict().values())
    dev = model.device
    if dev.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(dev), "peak allocated"
    else:
        peak, kind = rss("VmHWM") - baseline, "peak RSS increase"
    return f"rank {rank}: weights {weights / 2**20:.1f} MiB, {kind} {peak / 2**20:.1f} MiB"
