"""Sharded loading: every rank reads only its slices of the safetensors files.

The model is built on the meta device, parallelized (local shapes), allocated once, and each
checkpoint tensor is narrowed to this rank's slice while still a view of the memory map, so a
rank touches (and keeps) only the pages it needs; expert tensors of other ranks are never read.
FP8 slices are dequantized over the 128×128 scale blocks covering them only.

Quantized checkpoints (`dsv3 quantize` int8/int4/AWQ, AutoAWQ/GPTQ/compressed-tensors int4, and FP8
with `quantization="fp8"`) stay packed: each packed matrix is cut along the layer's split together with
its scales and zero points (`narrow_packed`: int8 rows or columns, each row keeping its scale; int4 rows,
or columns in whole groups; FP8 in whole 128-blocks) and becomes the packed variant of the parallel
layer (`dsv3.parallel.layers.QuantRowParallelLinear` & co., `QuantExperts` holding a range of experts
or a slice of each). A cut that falls inside a group or block runs that layer dense instead, from the
exactly dequantized slice (one log line says how many).
"""

from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path

import torch
from torch import nn

from dsv3.io.checkpoint import TensorIndex, checkpoint_files, dequantize_fp8, fp8_scale, has_mtp_weights, iter_checkpoint, resolve_dtype
from dsv3.config import ModelConfig
from dsv3.errors import CheckpointError
from dsv3.models.interface import CausalLM
from dsv3.models.registry import family
from dsv3.parallel.dist import ParallelConfig, ParallelError
from dsv3.parallel.layers import Shard, packed_like
from dsv3.parallel.shard import localize, owners, parallelize, pieces
from dsv3.layers.moe import Experts
from dsv3.io.safetensors import SafetensorsFile
from dsv3.quant.apply import ckpt_name, set_module
from dsv3.quant.foreign import FOREIGN_METHODS
from dsv3.quant.io import EMBED, PackedPlan, _Pending, build_packed, fill_embedding, module_shape, packed_plan, unsupported_method
from dsv3.quant.schemes import QuantError, ceil_to

log = logging.getLogger("dsv3.parallel")
Cut = tuple[int, int, int] | None  # (dim, start, end) of a full matrix this rank holds


def narrow_packed(fmt, d: dict, cut: Cut, full: tuple[int, int], prefix: str) -> dict | None:
    """dsv3 checkpoint tensors of one matrix [N, K] = `full`, cut to (dim, start, end) along with their scales and zero
    points; None when the cut does not fall on group (int4) or block (FP8) boundaries."""
    if cut is None:
        return d
    dim, a, b = cut
    if fmt.name == "int8":
        return {"weight": d["weight"].narrow(dim, a, b - a), "weight_scale": d["weight_scale"] if dim else d["weight_scale"][a:b]}
    if fmt.name == "int4":
        if dim == 0:
            return {k: v[a:b] for k, v in d.items()}
        g = fmt.stored_group(prefix)
        if a % g or (b % g and b != full[1]):
            return None
        hi = ceil_to(b, g)
        return {"weight_packed": d["weight_packed"][:, a // 2:hi // 2], "weight_scale": d["weight_scale"][:, a // g:hi // g],
                "weight_zero_point": d["weight_zero_point"][:, a // g:hi // g]}
    bs = fmt.block[dim]  # fp8
    if a % bs or (b % bs and b != full[dim]):
        return None
    return {"weight": d["weight"].narrow(dim, a, b - a), "weight_scale_inv": d["weight_scale_inv"].narrow(dim, a // bs, -(-b // bs) - a // bs)}


def _linear_cut(local: nn.Module) -> Cut:
    s = getattr(local, "shard", None)
    return (s.dim, s.start, s.end) if isinstance(s, Shard) else None


def _expert_cuts(local: Experts) -> dict[str, Cut]:
    inter = local.inter_shard
    if inter is None:
        return {"gate_proj": None, "up_proj": None, "down_proj": None}
    return {"gate_proj": (0, inter.start, inter.end), "up_proj": (0, inter.start, inter.end), "down_proj": (1, inter.start, inter.end)}


def _aligned(fmt, local: nn.Module, shape: tuple, prefix: str) -> bool:
    """Whether every matrix of a packed module is cut on group / block boundaries on this rank (see `narrow_packed`)."""
    if fmt.name == "int8":
        return True
    probe = lambda full, cut, p: cut is None or narrow_packed(fmt, _Probe(), cut, full, p) is not None  # noqa: E731
    if isinstance(local, Experts):
        E, D, Im = shape
        dims = {"gate_proj": (Im, D), "up_proj": (Im, D), "down_proj": (D, Im)}
        return all(probe(dims[p], c, f"{prefix}.0.{p}") for p, c in _expert_cuts(local).items())
    K, N = shape
    return probe((N, K), _linear_cut(local), prefix)


class _Probe(dict):
    """Stands in for a matrix's tensors when only the alignment of a cut is asked."""

    def __getitem__(self, key):
        return _Sliceable()


class _Sliceable:
    def __getitem__(self, key):
        return self

    def narrow(self, *args):
        return self


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
                 progress: bool = True, quantization: str | None = None) -> CausalLM:
    """Load rank `pc.rank`'s part of a checkpoint (eval mode); same arguments as `dsv3.io.load.load_model`.

    Quantized checkpoints load packed; an FP8 one is dequantized unless `quantization="fp8"`, which keeps it FP8.
    """
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    qc = cfg.quantization_config or {}
    method = qc.get("quant_method")
    if method not in (None, "fp8", "dsv3", *FOREIGN_METHODS):
        raise QuantError(f"{model_dir}: {unsupported_method(method)}")
    if quantization in ("int8", "int4") or (quantization == "fp8" and method != "fp8"):
        raise ParallelError(f"--quantization {quantization} quantizes while loading, which parallel runs do not do: write a "
                            f"quantized checkpoint with `dsv3 quantize --method {quantization}` and serve that")
    dtype = resolve_dtype(dtype, cfg)
    files = checkpoint_files(model_dir)
    if cfg.num_nextn_predict_layers == 0:
        with_mtp = False
    elif with_mtp is None:
        with_mtp = has_mtp_weights(files, cfg)
    with torch.device("meta"):
        full = family(cfg.model_type).model_class()(cfg, with_mtp=with_mtp)
        model = parallelize(family(cfg.model_type).model_class()(cfg, with_mtp=with_mtp), pc)
    plan, packed, dense_q, locals_ = None, {}, {}, {}
    if method in ("dsv3", *FOREIGN_METHODS) or (method == "fp8" and quantization == "fp8"):
        entries: dict[str, torch.dtype] = {}
        for path in files:
            with SafetensorsFile(path) as sf:
                entries.update({n: e[0] for n, e in sf.entries.items()})
        plan = packed_plan(cfg, full, entries, device)
        L = cfg.num_hidden_layers
        for name, fmt in plan.formats.items():
            local, shape = model.get_submodule(name), module_shape(full.get_submodule(name))
            locals_[name] = (local, shape)
            (packed if _aligned(fmt, local, shape, ckpt_name(name, L)) else dense_q)[name] = fmt
        for name in packed:
            set_module(model, name, _Pending())
        if dense_q and pc.rank == 0:  # every rank has the same layout: one line
            log.warning("%d packed module(s) cut inside an int4 group or FP8 block run dense (dequantized) on each rank: %s",
                        len(dense_q), ", ".join(sorted(dense_q)[:3]) + (" ..." if len(dense_q) > 3 else ""))
    model.to_empty(device=device)
    model.tie_weights()
    model.cast(dtype)
    model.reset_buffers()
    targets = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    own = owners(model)
    needed = {n for n in targets if n in model.state_dict()}
    if cfg.tie_word_embeddings:
        needed.discard("lm_head.weight")
    got: dict[str, dict] = {} if plan is None else {n: {} for n in plan.by_prefix.values()}
    for name in dense_q:
        needed -= {n for n in needed if n.startswith(name + ".")}
    if plan is not None and plan.embed is not None:
        needed.discard(f"{EMBED}.weight")

    def claim(sf: SafetensorsFile, name: str) -> bool:
        """Collect the packed tensors this rank needs (whole; cut once converted), skipping other ranks' experts."""
        owned = plan.owner(name) if plan is not None else None
        if owned is None:
            return False
        module, key = owned
        local = locals_.get(module, (None,))[0]
        if isinstance(local, Experts) and not local.first <= key[0] < local.first + local.count:
            return True
        got[module][key] = sf.get(name).clone()
        sf.release(name)
        return True

    filled: dict[str, int] = {}
    block = tuple(qc.get("weight_block_size") or (128, 128))
    with TensorIndex(files) as where:
        for sf, name, pname, index in iter_checkpoint(files, cfg, with_mtp, targets, f"loading rank {pc.rank}", progress, where,
                                                      claim=claim):
            placed = localize(pname, index, own.get(pname))
            if placed is None:
                continue  # another rank's expert: never read
            dest_index, cut = placed
            dest = targets[pname][dest_index] if dest_index else targets[pname]
            src = sf.get(name)
            if src.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # dequantize only this rank's blocks
                holder, scale = fp8_scale(sf, name, where)
                src = narrow_fp8(src, scale, block, cut, name)
                holder.release(name.removesuffix("weight") + "weight_scale_inv")
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
    if plan is not None:
        _place_packed(model, plan, packed, dense_q, locals_, got, dtype)
        if plan.embed is not None:
            emb = model.model.embed_tokens
            shard = getattr(emb, "shard", None)
            fill_embedding(model, plan, got.pop(EMBED, {}), rows=None if shard is None or plan.embed == "lm_head"
                           else (shard.start, shard.end))
    for n in sorted(needed):
        if filled.get(n, 0) < pieces(own.get(n), n, cfg):
            raise CheckpointError(f"tensor for {n!r} is missing from the checkpoint in {model_dir}")
    return model.eval()


def _place_packed(model: nn.Module, plan: PackedPlan, packed: dict, dense_q: dict, locals_: dict, got: dict,
                  dtype: torch.dtype) -> None:
    """Build this rank's packed modules from the collected tensors (cut to its slice), and fill the dense layers of
    modules whose cut is not aligned with dequantized slices."""
    L = model.config.num_hidden_layers
    for name, fmt in {**packed, **dense_q}.items():
        local, shape = locals_[name]
        prefix = ckpt_name(name, L)
        mats = plan.matrices(name, got.pop(name), shape)
        if isinstance(local, Experts):
            E, D, Im = shape
            cuts = _expert_cuts(local)
            dims = {"gate_proj": (Im, D), "up_proj": (Im, D), "down_proj": (D, Im)}
            if name in dense_q:
                _fill_dense_experts(local, fmt, mats, dims, cuts, prefix)
                continue
            im = Im if local.inter_shard is None else local.inter_shard.size
            cut = {k: narrow_packed(fmt, d, cuts[k[1]], dims[k[1]], f"{prefix}.{k[0]}.{k[1]}") for k, d in mats.items()}
            q = build_packed(fmt, {(j - local.first, p): d for (j, p), d in cut.items()}, (local.count, D, im), name, L, dtype,
                             count=local.count)
            q.n_experts, q.first, q.count, q.all_reduce = E, local.first, local.count, local.all_reduce
            set_module(model, name, q)
            continue
        K, N = shape
        cut = _linear_cut(local)
        if name in dense_q:
            w = fmt.dequant(fmt.load(mats[None], N, K, prefix), N, K)
            if cut is not None:
                w = w.narrow(cut[0], cut[1], cut[2] - cut[1])
            with torch.no_grad():
                local.weight.copy_(w)
            continue
        d = narrow_packed(fmt, mats[None], cut, (N, K), prefix)
        q = build_packed(fmt, {None: d}, (local.in_features, local.out_features), name, L, dtype)
        set_module(model, name, packed_like(local, q))


def _fill_dense_experts(local: Experts, fmt, mats: dict, dims: dict, cuts: dict, prefix: str) -> None:
    for (j, proj), d in mats.items():
        N, K = dims[proj]
        w = fmt.dequant(fmt.load(d, N, K, f"{prefix}.{j}.{proj}"), N, K)
        cut = cuts[proj]
        if cut is not None:
            w = w.narrow(cut[0], cut[1], cut[2] - cut[1])
        jl = j - local.first
        with torch.no_grad():
            if proj == "down_proj":
                local.down_proj[jl].copy_(w)
            else:
                im = w.shape[0]
                rows = slice(0, im) if proj == "gate_proj" else slice(im, 2 * im)
                local.gate_up_proj[jl, rows].copy_(w)


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
