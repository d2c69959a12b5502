"""Self-describing quantized checkpoints: `quantization_config` in config.json, packed safetensors.

Layout is the Hugging Face one (routed experts split per expert, MTP as layer L+k); each converted
linear `<name>` stores its format's tensors (`dsv3.quant.formats`) instead of `<name>.weight`.
FP8 uses DeepSeek's released layout, so an official FP8 checkpoint loads here and stays in FP8;
AutoAWQ, GPTQ and compressed-tensors int4 files (`dsv3.quant.foreign`) load into the int4 format.
Everything left unquantized is stored in bf16 (norms, the router and DSA's indexer head weights excepted: they stay fp32), and the
token embedding may be stored quantized too (`quantization_config.embed_tokens`): it is only gathered
from, so it is expanded to a dense table at load and keeps its memory, but not its bytes on disk.
Loading allocates only the unconverted tensors densely; converted modules are built from the packed
tensors directly, and every tensor is checked against the shape and dtype the config implies.
`PackedPlan` says which modules a checkpoint stores packed and in which format; the sharded loader
(`dsv3.parallel.load`) uses it too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
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
from dsv3.quant.foreign import FOREIGN_METHODS, ForeignInt4, foreign_scheme
from dsv3.quant.formats import FP8Format, Format, Int4Format, make_format
from dsv3.quant.linear import QuantLinear
from dsv3.quant.schemes import QuantError
from dsv3.io.safetensors import SafetensorsFile

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(\w+)$")
QUANT_METHODS = ("dsv3", "fp8", *FOREIGN_METHODS)
EMBED = "model.embed_tokens"
# kept fp32 when saving: the router, and DSA's indexer head weights (fp32 in the reference; top-k decisions hang on them)
_ROUTER = re.compile(r"(\.mlp\.gate\.(weight|e_score_correction_bias)|\.indexer\.weights_proj\.weight)$")


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


def embed_quantized(model: nn.Module):
    """`(format, tensors, shared_with_head)` of a quantized token embedding (`quantize_model(embedding=...)`), or None."""
    return model.model.embed_tokens.__dict__.get("quantized")


def save_quantized(model: CausalLM, out_dir: str | Path, tokenizer_from: str | Path | None = None,
                   dtype: torch.dtype | str | None = None) -> Path:
    """Write config.json (with quantization_config) and model.safetensors.

    Unconverted matrices (a kept embedding or LM head) are stored in `dtype` (default bf16, whatever the
    model computes in); norms (which AWQ rescales) and the router stay fp32. A quantized embedding is
    stored in its format, or not at all when it shares the LM head's tensors (a tied model). The MTP
    layers' copies of the embedding and head, which loading ignores, are not written.
    """
    save_dtype = resolve_dtype(dtype if dtype is not None else "bf16", model.config)
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
    embed = embed_quantized(model)
    L = model.config.num_hidden_layers
    try:
        for name, make, _ in export_tensors(model):
            if name.rsplit(".", 1)[0] in qprefixes or (embed is not None and name == f"{EMBED}.weight"):
                continue
            m = re.match(r"^model\.layers\.(\d+)\.(embed_tokens|shared_head\.head)\.weight$", name)
            if m and int(m.group(1)) >= L:
                continue  # MTP's copies of the shared embedding and head: loading never reads them
            t = make().detach().cpu()
            if t.is_floating_point() and t.dim() >= 2 and not _ROUTER.search(name):
                t = t.to(save_dtype)
            tensors[name] = t
    finally:
        model.lm_head = head
    tensors.update({n: t.contiguous() for n, t in quantized_tensors(model)})
    if embed is not None and not embed[2]:
        fmt, t = embed[0], embed[1]
        V, D = model.model.embed_tokens.weight.shape
        tensors.update({f"{EMBED}.{k}": v.contiguous() for k, v in fmt.export(t, V, D).items()})
    model.config.save(out)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_from is not None:
        copy_tokenizer_files(tokenizer_from, out)
    return out


class _Pending(nn.Module):
    """Stands in for a converted module while the dense part of the model is allocated."""


@dataclass
class PackedPlan:
    """Which modules a checkpoint stores packed, in which format, and how their tensors are named.

    formats: internal module name -> format (every quantized linear / expert stack); scheme: the foreign
    packing their tensors are converted from (None for dsv3 and FP8 files); embed: the token embedding's
    format, "lm_head" when it is stored as the (tied) LM head, or None when stored dense.
    """

    formats: dict[str, Format]
    scheme: ForeignInt4 | None = None
    embed: Format | str | None = None
    by_prefix: dict[str, str] = field(default_factory=dict)  # checkpoint prefix -> internal module name

    def owner(self, name: str) -> tuple[str, object] | None:
        """(internal module, key) for a checkpoint tensor of a packed module (key: "qweight"-like, or
        (expert, proj, key) for routed experts), None for a tensor loaded densely."""
        e = _EXPERT.match(name)
        owner, key = (e.group(1), (int(e.group(2)), e.group(3), e.group(4))) if e else tuple(name.rsplit(".", 1))
        if owner in self.by_prefix:
            return self.by_prefix[owner], key
        return None

    def keys(self, fmt: Format) -> tuple[str, ...]:
        return self.scheme.ckpt_keys if self.scheme is not None else fmt.ckpt_keys

    def matrices(self, name: str, got: dict, shape: tuple) -> dict:
        """The collected checkpoint tensors of one packed module -> dsv3 checkpoint tensors per matrix: {None: d}
        for a linear (shape (K, N)), {(expert, proj): d} for routed experts (shape (E, D, Im); experts absent from
        `got` are skipped, as under expert parallelism)."""
        fmt = self.formats.get(name) if name != EMBED else self.embed
        prefix = ckpt_name(name, self._L)
        keys = self.keys(fmt)
        extra = [k for k in got if (k if isinstance(k, str) else k[2]) not in keys or (not isinstance(k, str) and k[0] >= shape[0])]
        if extra:
            k = extra[0]
            shown = f"{prefix}.{k}" if isinstance(k, str) else f"{prefix}.{k[0]}.{k[1]}.{k[2]}"
            what = self.scheme.method if self.scheme is not None else fmt.name
            raise QuantError(f"tensor {shown} does not belong to the {what} format config.json declares for {prefix}")
        if len(shape) == 2:
            K, N = shape
            return {None: self._convert(got, N, K, prefix)}
        E, D, Im = shape
        dims = {"gate_proj": (Im, D), "up_proj": (Im, D), "down_proj": (D, Im)}
        out = {}
        for j in sorted({k[0] for k in got}):
            for proj in PROJ:
                d = {k[2]: v for k, v in got.items() if k[0] == j and k[1] == proj}
                out[(j, proj)] = self._convert(d, *dims[proj], f"{prefix}.{j}.{proj}")
        return out

    def _convert(self, d: dict, N: int, K: int, name: str) -> dict:
        return self.scheme.to_int4(d, N, K, name) if self.scheme is not None else d

    _L: int = 0


def packed_plan(cfg: ModelConfig, model: nn.Module, entries: dict[str, torch.dtype], device,
                keep_fp8: bool = True) -> PackedPlan:
    """The `PackedPlan` of a checkpoint for `model` (built on the meta device, possibly parallelized): dsv3's own
    files by their quantization_config, FP8 and foreign int4 files by which modules hold the packed tensors.
    `keep_fp8=False` plans no FP8 module (the files are then read dequantized)."""
    qc = cfg.quantization_config or {}
    method = qc.get("quant_method")
    if method not in QUANT_METHODS:
        raise QuantError(unsupported_method(method))
    L = cfg.num_hidden_layers
    scheme = foreign_scheme(qc) if method in FOREIGN_METHODS else None
    targets = quant_targets(model, include_lm_head=method != "dsv3" or bool(qc.get("lm_head", False)))
    plan = PackedPlan({}, scheme)
    plan._L = L
    if method == "dsv3":
        groups = qc.get("group_sizes") or {}
        if not isinstance(groups, dict):
            raise QuantError(f"config.json quantization_config.group_sizes is {type(groups).__name__}, expected a mapping name -> group")
        fmt = make_format(qc.get("format", ""), int(qc.get("group_size", 128)), bool(qc.get("zero_point", True)), device, groups)
        head = qc.get("lm_head")
        if isinstance(head, str) and head not in HEAD_FORMATS:
            raise QuantError(f"config.json quantization_config.lm_head is {head!r}; expected true, false or one of {', '.join(HEAD_FORMATS)}")
        head_fmt = make_format(head, device=device) if isinstance(head, str) else fmt
        plan.formats = {name: head_fmt if name == "lm_head" else fmt for name, _ in targets}
        emb = qc.get("embed_tokens") or None
        if emb == "lm_head":
            if "lm_head" not in plan.formats:
                raise QuantError("config.json quantization_config.embed_tokens is 'lm_head' but the LM head is not quantized")
            plan.embed = "lm_head"
        elif emb is not None:
            if emb not in ("int8", "int4", "fp8"):
                raise QuantError(f"config.json quantization_config.embed_tokens is {emb!r}; expected false, 'lm_head', int8, int4 or fp8")
            plan.embed = make_format(emb, int(qc.get("group_size", 128)), bool(qc.get("zero_point", True)), device, groups)
    else:
        for name, m in targets:  # fp8 / foreign: a module is packed iff its checkpoint holds the packed weight
            key = scheme.probe if scheme is not None else "weight"
            probe = f"{ckpt_name(name, L)}.0.gate_proj.{key}" if isinstance(m, Experts) else f"{ckpt_name(name, L)}.{key}"
            if scheme is not None and probe in entries:
                plan.formats[name] = Int4Format(scheme.group_size, True, device)
            elif scheme is None and keep_fp8 and entries.get(probe) == torch.float8_e4m3fn:
                plan.formats[name] = FP8Format(device)
    plan.by_prefix = {ckpt_name(n, L): n for n in plan.formats}
    if plan.embed is not None and not isinstance(plan.embed, str):
        plan.by_prefix[EMBED] = EMBED
    return plan


def unsupported_method(method) -> str:
    return (f"config.json quantization_config.quant_method {method!r} is not supported (dsv3 reads fp8, awq (AutoAWQ GEMM), "
            "gptq, compressed-tensors (pack-quantized int4) and its own dsv3 files)")


def module_shape(m: nn.Module) -> tuple:
    """(K, N) of a linear, (E, D, Im) of an expert stack (full sizes, as the checkpoint stores them)."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    return tuple(m.down_proj.shape)


def load_quantized(model_dir: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
                   with_mtp: bool | None = None, progress: bool = True) -> CausalLM:
    """Load a checkpoint written by `save_quantized`, an official FP8 one or an AutoAWQ / GPTQ / compressed-tensors
    int4 one, with packed modules."""
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
    plan = packed_plan(cfg, model, entries, device)
    shapes = {n: module_shape(model.get_submodule(n)) for n in plan.formats}
    for n in plan.formats:
        set_module(model, n, _Pending())
    model.to_empty(device=device)
    model.tie_weights()
    model.cast(dtype)
    model.reset_buffers()
    pending: dict[str, dict] = {n: {} for n in plan.by_prefix.values()}
    targets = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    needed = {n for n in targets if n in model.state_dict()} - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    if plan.embed is not None:
        needed.discard(f"{EMBED}.weight")
    filled: set[str] = set()
    bar = tqdm(total=len(entries), desc="loading", disable=not progress)
    for path in files:
        with SafetensorsFile(path) as sf:
            for name in sf.keys():
                bar.update(1)
                owned = plan.owner(name)
                if owned is not None:
                    pending[owned[0]][owned[1]] = sf.get(name).clone()
                    sf.release(name)
                    continue
                _load_dense(sf, name, cfg, with_mtp, targets, filled)
    bar.close()
    for n, fmt in plan.formats.items():
        set_module(model, n, build_packed(fmt, plan.matrices(n, pending.pop(n), shapes[n]), shapes[n], n, L, dtype))
    if plan.embed is not None:
        fill_embedding(model, plan, pending.pop(EMBED, {}))
    for n in sorted(needed - filled):
        raise QuantError(f"tensor for {n!r} is missing from the checkpoint in {model_dir}")
    return model.eval()


def fill_embedding(model: nn.Module, plan: PackedPlan, got: dict, rows: tuple[int, int] | None = None) -> None:
    """Expand a quantized token embedding (or the LM head it shares) into the dense table, rows [start, end) of it
    for a vocabulary-parallel shard."""
    emb = model.model.embed_tokens
    cfg = model.config
    V, D = cfg.vocab_size, cfg.hidden_size
    if plan.embed == "lm_head":
        head = model.lm_head
        w = head.fmt.dequant(head.tensors, head.out_features, head.in_features)
        fmt, t, shared = head.fmt, head.tensors, True
    else:
        fmt = plan.embed
        t = fmt.load(plan.matrices(EMBED, got, (D, V))[None], V, D, EMBED)
        w, shared = fmt.dequant(t, V, D), False
    if rows is not None:
        w = w[rows[0]:rows[1]]
    if tuple(w.shape) != tuple(emb.weight.shape):
        raise QuantError(f"the quantized embedding has shape {list(w.shape)}, the model expects {list(emb.weight.shape)}")
    with torch.no_grad():
        emb.weight.copy_(w)
    if rows is None:
        emb.__dict__["quantized"] = (fmt, t, shared)


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


def build_packed(fmt, mats: dict, shape: tuple, name: str, L: int, dtype: torch.dtype, count: int | None = None) -> nn.Module:
    """A QuantLinear (shape (K, N)) or QuantExperts (shape (E, D, Im); `count` local experts, default E) from dsv3
    checkpoint tensors per matrix (`PackedPlan.matrices`, possibly narrowed to a shard)."""
    prefix = ckpt_name(name, L)
    if len(shape) == 2:
        K, N = shape
        return QuantLinear(fmt, K, N, fmt.load(mats[None], N, K, prefix), act_dtype=dtype)
    E, D, Im = shape
    dims = {"gate_proj": (Im, D), "up_proj": (Im, D), "down_proj": (D, Im)}
    experts = sorted({j for j, _ in mats})
    if len(experts) != (E if count is None else count):
        missing = sorted(set(range(E)) - set(experts))[:1] or experts[:1]
        raise QuantError(f"tensor {prefix}.{missing[0]}.gate_proj is missing from the quantized checkpoint")
    tensors = {}
    for proj in PROJ:
        per = [fmt.load(mats[(j, proj)], *dims[proj], f"{prefix}.{j}.{proj}") for j in experts]
        tensors[proj] = {k: torch.stack([p[k] for p in per]) for k in per[0]}
    return QuantExperts(fmt, len(experts), D, Im, tensors, act_dtype=dtype)


def is_quantized_dir(model_dir: str | Path) -> bool:
    """Whether config.json declares a quantization this module loads (dsv3 int8/int4, fp8, awq, gptq, compressed-tensors)."""
    try:
        qc = json.loads(Path(model_dir, "config.json").read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError):
        return False
    return qc.get("quant_method") in QUANT_METHODS
