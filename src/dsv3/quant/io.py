"""Self-describing quantized checkpoints: `quantization_config` in config.json, packed safetensors.

Layout is the Hugging Face one (routed experts split per expert, MTP as layer L+k); each converted
linear `<name>` stores its format's tensors (`dsv3.quant.formats`) instead of `<name>.weight`.
FP8 uses DeepSeek's released layout, so an official FP8 checkpoint loads here and stays in FP8.
Loading allocates only the unconverted tensors densely; converted modules are built from the packed
tensors directly, and every tensor is checked against the shape and dtype the config implies.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from dsv3.io.checkpoint import checkpoint_files, copy_tokenizer_files, export_tensors, map_name, resolve_dtype
from dsv3.io.save import remove_stale_weights
from dsv3.config import ModelConfig
from dsv3.models.interface import CausalLM
from dsv3.models.registry import family
from dsv3.layers.moe import Experts
from dsv3.quant.apply import HEAD_FORMATS, ckpt_name, quant_targets, set_module
from dsv3.quant.experts import PROJ, QuantExperts
from dsv3.quant.formats import FP8Format, make_format
from dsv3.quant.linear import QuantLinear
from dsv3.quant.schemes import QuantError
from dsv3.io.safetensors import SafetensorsFile

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(\w+)$")
QUANT_METHODS = ("dsv3", "fp8")
_ROUTER = re.compile(r"\.mlp\.gate\.(weight|e_score_correction_bias)$")


def quantized_tensors(model: CausalLM):
    """(checkpoint name, tensor) for every converted module."""
    L = model.config.num_hidden_layers
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            for k, t in m.export().items():
                yield f"{ckpt_name(name, L)}.{k}", t
        elif isinstance(m, QuantExperts):
            for e in range(m.n_experts):
                for proj, tensors in m.export(e).items():
                    for k, t in tensors.items():
                        yield f"{ckpt_name(name, L)}.{e}.{proj}.{k}", t


def save_quantized(model: CausalLM, out_dir: str | Path, tokenizer_from: str | Path | None = None,
                   dtype: torch.dtype | str | None = None) -> Path:
    """Write config.json (with quantization_config) and model.safetensors.

    Unconverted matrices (embeddings, a dense LM head) are stored in `dtype` (default: the config's
    torch_dtype, e.g. bf16 even if the model computes in fp32); norms (which AWQ rescales) and the
    router stay fp32.
    """
    save_dtype = resolve_dtype(dtype, model.config) if dtype is not None or model.config.torch_dtype else None
    from safetensors.torch import save_file

    if not model.config.quantization_config:
        raise QuantError("the model is not quantized (no quantization_config): run quantize_model first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_weights(out)
    qnames = {n for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantExperts))}
    qprefixes = {ckpt_name(q, model.config.num_hidden_layers) for q in qnames}
    tensors = {}
    head = model.lm_head
    if isinstance(head, QuantLinear):  # the MTP layers' `shared_head.head` copies are written dense, as DeepSeek ships them
        model.lm_head = nn.Linear(head.in_features, head.out_features, bias=False, device="meta")
        model.lm_head.weight = nn.Parameter(head.fmt.dequant(head.tensors, head.out_features, head.in_features), requires_grad=False)
    try:
        for name, make, _ in export_tensors(model):
            if name.rsplit(".", 1)[0] not in qprefixes:
                t = make().detach().cpu()
                if save_dtype is not None and t.is_floating_point() and t.dim() >= 2 and not _ROUTER.search(name):
                    t = t.to(save_dtype)
                tensors[name] = t
    finally:
        model.lm_head = head
    tensors.update({n: t.contiguous() for n, t in quantized_tensors(model)})
    model.config.save(out)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_from is not None:
        copy_tokenizer_files(tokenizer_from, out)
    return out


class _Pending(nn.Module):
    """Stands in for a converted module while the dense part of the model is allocated."""


def _target_formats(cfg: ModelConfig, model: nn.Module, entries: dict[str, torch.dtype], device) -> dict[str, object]:
    """internal module name -> format, for the modules stored quantized in this checkpoint."""
    qc = cfg.quantization_config or {}
    method = qc.get("quant_method")
    if method not in QUANT_METHODS:
        raise QuantError(f"config.json quantization_config.quant_method is {method!r}; load_quantized reads {', '.join(QUANT_METHODS)}")
    L = cfg.num_hidden_layers
    targets = quant_targets(model, include_lm_head=method == "fp8" or bool(qc.get("lm_head", False)))
    if method == "dsv3":
        groups = qc.get("group_sizes") or {}
        if not isinstance(groups, dict):
            raise QuantError(f"config.json quantization_config.group_sizes is {type(groups).__name__}, expected a mapping name -> group")
        fmt = make_format(qc.get("format", ""), int(qc.get("group_size", 128)), bool(qc.get("zero_point", True)), device, groups)
        head = qc.get("lm_head")
        if isinstance(head, str) and head not in HEAD_FORMATS:
            raise QuantError(f"config.json quantization_config.lm_head is {head!r}; expected true, false or one of {', '.join(HEAD_FORMATS)}")
        head_fmt = make_format(head, device=device) if isinstance(head, str) else fmt
        return {name: head_fmt if name == "lm_head" else fmt for name, _ in targets}
    out = {}
    for name, m in targets:  # fp8: a module is FP8 iff its checkpoint weight is
        probe = f"{ckpt_name(name, L)}.0.gate_proj.weight" if isinstance(m, Experts) else f"{ckpt_name(name, L)}.weight"
        if entries.get(probe) == torch.float8_e4m3fn:
            out[name] = FP8Format(device)
    return out


def load_quantized(model_dir: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
                   with_mtp: bool | None = None, progress: bool = True) -> CausalLM:
    """Load a checkpoint written by `save_quantized` (or an official FP8 one) with packed modules."""
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    dtype = resolve_dtype(dtype, cfg, device)  # 'auto' is fp32 on CPU, as for load_model
    files = checkpoint_files(model_dir)
    entries: dict[str, torch.dtype] = {}
    for path in files:
        with SafetensorsFile(path) as sf:
            entries.update({n: e[0] for n, e in sf.entries.items()})
    L = cfg.num_hidden_layers
    if cfg.num_nextn_predict_layers == 0:
        with_mtp = False
    elif with_mtp is None:
        with_mtp = any(n.startswith(f"model.layers.{L}.") for n in entries)
    with torch.device("meta"):
        model = family(cfg.model_type).model_class()(cfg, with_mtp=with_mtp)
    formats = _target_formats(cfg, model, entries, device)
    shapes = {n: (model.get_submodule(n).in_features, model.get_submodule(n).out_features) if isinstance(model.get_submodule(n), nn.Linear)
              else tuple(model.get_submodule(n).down_proj.shape) for n in formats}
    for n in formats:
        set_module(model, n, _Pending())
    model.to_empty(device=device)
    model.tie_weights()
    model.cast(dtype)
    model.reset_buffers()
    by_prefix = {ckpt_name(n, L): n for n in formats}
    pending: dict[str, dict] = {n: {} for n in formats}
    targets = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    needed = {n for n in targets if n in model.state_dict()} - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    filled: set[str] = set()
    bar = tqdm(total=len(entries), desc="loading", disable=not progress)
    for path in files:
        with SafetensorsFile(path) as sf:
            for name in sf.keys():
                bar.update(1)
                e = _EXPERT.match(name)
                owner, key = (e.group(1), (int(e.group(2)), e.group(3), e.group(4))) if e else tuple(name.rsplit(".", 1))
                if owner in by_prefix:
                    pending[by_prefix[owner]][key] = sf.get(name).clone()
                    sf.release(name)
                    continue
                _load_dense(sf, name, cfg, with_mtp, targets, filled)
    bar.close()
    for n, fmt in formats.items():
        set_module(model, n, _build(fmt, n, pending.pop(n), shapes[n], cfg, L, dtype))
    for n in sorted(needed - filled):
        raise QuantError(f"tensor for {n!r} is missing from the checkpoint in {model_dir}")
    return model.eval()


def _load_dense(sf: SafetensorsFile, name: str, cfg: ModelConfig, with_mtp: bool, targets: dict, filled: set) -> None:
    if name.endswith("rotary_emb.inv_freq"):
        return
    target = map_name(name, cfg, with_mtp)
    if target is None or (target[0] == "lm_head.weight" and cfg.tie_word_embeddings):
        return
    pname, index = target
    if pname not in targets:
        raise QuantError(f"{sf.path.name}: unexpected tensor {name!r} (not in the format config.json declares?)")
    dest = targets[pname][index] if index else targets[pname]
    src = sf.get(name)
    if tuple(src.shape) != tuple(dest.shape):
        raise QuantError(f"{sf.path.name}: tensor {name!r} has shape {list(src.shape)}, the model expects {list(dest.shape)}")
    with torch.no_grad():
        dest.copy_(src)
    sf.release(name)
    filled.add(pname if not index else f"{pname}")


def _build(fmt, name: str, got: dict, shape: tuple[int, int], cfg: ModelConfig, L: int, dtype: torch.dtype) -> nn.Module:
    prefix = ckpt_name(name, L)
    extra = [k for k in got if (k if isinstance(k, str) else k[2]) not in fmt.ckpt_keys or (not isinstance(k, str) and k[0] >= shape[0])]
    if extra:
        k = extra[0]
        shown = f"{prefix}.{k}" if isinstance(k, str) else f"{prefix}.{k[0]}.{k[1]}.{k[2]}"
        raise QuantError(f"tensor {shown} does not belong to the {fmt.name} format config.json declares for {prefix}")
    if len(shape) == 2:
        K, N = shape
        return QuantLinear(fmt, K, N, fmt.load(got, N, K, prefix), act_dtype=dtype)
    E, D, Im = shape
    dims = {"gate_proj": (Im, D), "up_proj": (Im, D), "down_proj": (D, Im)}
    tensors = {}
    for proj in PROJ:
        per = []
        for j in range(E):
            d = {k[2]: v for k, v in got.items() if k[0] == j and k[1] == proj}
            per.append(fmt.load(d, *dims[proj], f"{prefix}.{j}.{proj}"))
        tensors[proj] = {k: torch.stack([p[k] for p in per]) for k in per[0]}
    return QuantExperts(fmt, E, D, Im, tensors, act_dtype=dtype)


def is_quantized_dir(model_dir: str | Path) -> bool:
    """Whether config.json declares a quantization this module loads (dsv3 int8/int4, or fp8)."""
    try:
        qc = json.loads(Path(model_dir, "config.json").read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError):
        return False
    return qc.get("quant_method") in QUANT_METHODS
