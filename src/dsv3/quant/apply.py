"""Quantize a loaded model in place: pick the linears and experts, optionally calibrate (AWQ), swap.

What is converted: every `nn.Linear` of the decoder layers and MTP modules (MLA projections, dense
MLPs, shared experts, `eh_proj`) and every routed-expert stack; the LM head and the token embedding
on request (`dsv3 quantize` asks for both by default, as llama.cpp's Q8_0 quantizes them). The embedding
is only gathered from, so it keeps a dense table in memory (holding the dequantized values) and its
packed tensors for saving.
What is never converted: norms and the fp32 router (`mlp.gate`, with its correction
bias) and DSA's indexer head weights (`indexer.weights_proj`, fp32 in the reference), because they are
small and routing and top-k decisions are sensitive to them.
"""

from __future__ import annotations

import re
import warnings
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from dsv3 import ops
from dsv3.layers.moe import Experts
from dsv3.quant.experts import QuantExperts
from dsv3.quant.formats import Format, make_format
from dsv3.quant.linear import QuantLinear
from dsv3.quant.schemes import QuantError
from dsv3.models.registry import family

METHODS = ("int8", "int4", "awq", "fp8")
FORMAT_OF = {"int8": "int8", "int4": "int4", "awq": "int4", "fp8": "fp8"}


def check_method(method: str) -> str:
    if method not in METHODS:
        raise QuantError(f"unknown quantization method {method!r} (use {', '.join(METHODS)})")
    return method


def quant_targets(model: nn.Module, include_lm_head: bool = False) -> list[tuple[str, nn.Module]]:
    """(name, module) of every linear / expert stack that a quantization method converts."""
    out = []
    for name, m in model.named_modules():
        if not (name.startswith("model.layers.") or name.startswith("model.mtp.")):
            continue
        if isinstance(m, (nn.Linear, Experts)) and not name.endswith("indexer.weights_proj"):
            out.append((name, m))  # (DSA's per-head weights stay in full precision, as the reference keeps them)
    if include_lm_head and not model.config.tie_word_embeddings:
        out.append(("lm_head", model.lm_head))
    return out


def ckpt_name(name: str, num_layers: int) -> str:
    """Internal module/tensor name -> checkpoint name (MTP module k is layer L+k)."""
    m = re.match(r"^model\.mtp\.(\d+)\.(block\.)?(.*)$", name)
    return f"model.layers.{num_layers + int(m.group(1))}.{m.group(3)}" if m else name


def group_sizes(model: nn.Module, targets: list[tuple[str, nn.Module]], fmt: Format) -> dict[str, int]:
    """Checkpoint name -> int4 group, for the matrices whose group differs from the requested one."""
    L, out = model.config.num_hidden_layers, {}
    for name, m in targets:
        widths = ({"gate_proj": m.gate_up_proj.shape[-1], "up_proj": m.gate_up_proj.shape[-1], "down_proj": m.down_proj.shape[-1]}
                  if isinstance(m, Experts) else {"": m.in_features})
        for proj, K in widths.items():
            if fmt.group_for(K) != fmt.group_size:
                out[ckpt_name(name, L) + (f".*.{proj}" if proj else "")] = fmt.group_for(K)
    return out


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    ops.invalidate()  # plans built before hold the replaced module's tensors


def convert(module: nn.Module, fmt: Format, clip: dict[str, torch.Tensor] | torch.Tensor | None = None) -> nn.Module:
    if isinstance(module, Experts):
        return QuantExperts.from_experts(module, fmt, clip)
    return QuantLinear.from_linear(module, fmt, clip)


def quantization_config(method: str, fmt: Format, include_lm_head: bool | str, groups: dict[str, int] | None = None,
                        embedding: str | None = None) -> dict:
    """The `quantization_config` written to config.json (DeepSeek's own spelling for fp8). `lm_head`: false,
    true (the head in the body's format) or a format name (e.g. "int8" beside int4 layers); `embed_tokens`: the
    embedding's format, "lm_head" (stored once, as the tied head) or false."""
    if method == "fp8":
        return {"quant_method": "fp8", **fmt.config()}
    return {"quant_method": "dsv3", "format": fmt.name, **fmt.config(), **({"group_sizes": groups} if groups else {}),
            "calibration": "awq" if method == "awq" else "rtn", "lm_head": include_lm_head, "embed_tokens": embedding or False,
            "modules_not_converted": ["*norm*", "*.mlp.gate", "*.indexer.weights_proj"] + ([] if embedding else ["model.embed_tokens"])
            + ([] if include_lm_head else ["lm_head"]),
            "version": 2 if groups else 1}


def untie_lm_head(model: nn.Module) -> None:
    """Give the LM head its own copy of the tied embedding, so it can be quantized (as llama.cpp's
    `output.weight`) while the embedding, which is only gathered from, keeps full precision."""
    model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False


HEAD_FORMATS = ("int8",)  # a head format other than the body's: int8 beside int4 layers (llama.cpp's Q4_K_M keeps Q6_K)
EMBED_FORMATS = {"int8": ("int8",), "int4": ("int4", "int8"), "awq": ("int4", "int8"), "fp8": ()}  # per method


def check_embedding(method: str, embedding: bool | str) -> str | None:
    """The token embedding's format for `method` (True: the method's own), or None to keep it; QuantError if the
    method's files cannot record it: int8 files take int8, int4/AWQ files int4 or int8, fp8 files none (DeepSeek's FP8
    layout has a bf16 embedding). Checked before any model loads."""
    if not embedding:
        return None
    fmt = FORMAT_OF[check_method(method)] if embedding is True else embedding
    allowed = EMBED_FORMATS[method]
    if fmt not in allowed:
        raise QuantError(f"the token embedding of a {method} checkpoint can be quantized to "
                         f"{' or '.join(allowed) or 'nothing'}, not {fmt!r}"
                         + (" (fp8 checkpoints keep DeepSeek's layout: a bf16 embedding)" if method == "fp8" else ""))
    return fmt


def quantize_embedding(model: nn.Module, fmt: Format, shared_head: bool = False) -> None:
    """Quantize the token embedding (round to nearest): the dense table keeps the dequantized values, which is what
    a gather reads, and the packed tensors ride along for `save_quantized`. `shared_head`: the (formerly tied) LM
    head holds exactly these tensors, so they are stored once."""
    emb = model.model.embed_tokens
    w = emb.weight.detach()
    V, D = w.shape
    if shared_head:
        t = model.lm_head.tensors
    else:
        t = fmt.quantize(w)
    with torch.no_grad():
        emb.weight.copy_(fmt.dequant(t, V, D).to(w.dtype))
    emb.__dict__["quantized"] = (fmt, t, shared_head)


def default_policy(method: str) -> tuple[bool | str, str | None]:
    """What `dsv3 quantize` does with the LM head and the embedding by default, per method: int8 both; int4/awq an
    int8 head (as Q4_K_M keeps llama.cpp's output matrix at 6 bits) and an int4 embedding (Q4_K_M's token_embd is
    4-bit too); fp8 an fp8 head and a bf16 embedding (DeepSeek's FP8 layout has no FP8 embedding)."""
    return {"int8": (True, "int8"), "int4": ("int8", "int4"), "awq": ("int8", "int4"), "fp8": (True, None)}[method]


def quantize_model(model: nn.Module, method: str, group_size: int = 128, zero_point: bool = True,
                   calib: torch.Tensor | Sequence[Sequence[int]] | None = None, include_lm_head: bool | str = False,
                   progress: bool = True, embedding: bool | str = False, **awq_options) -> dict:
    """Quantize `model` in place with int8 | int4 | awq | fp8; returns (and sets) its quantization_config.

    calib: token ids [n_samples, seq_len] (AWQ only). include_lm_head: True quantizes the LM head in
    the method's format, "int8" in int8 whatever the method. embedding: True quantizes the token embedding
    in the method's format (int8 or int4, round to nearest), "int8"/"int4" in that one. Call after any dtype
    cast: the packed buffers are not meant to be cast again.
    """
    check_method(method)
    family(model.config.model_type).refuse("quantization")
    if isinstance(include_lm_head, str) and include_lm_head not in HEAD_FORMATS:
        raise QuantError(f"unknown LM head format {include_lm_head!r} (use {', '.join(HEAD_FORMATS)})")
    if method == "fp8" and isinstance(include_lm_head, str):
        raise QuantError("fp8 checkpoints keep DeepSeek's layout: the LM head can only be fp8 too (--lm-head)")
    embedding = check_embedding(method, embedding)
    tied = model.config.tie_word_embeddings
    fmt = make_format(FORMAT_OF[method], group_size, zero_point, device=model.device)
    clips: dict[str, object] = {}
    if method == "awq":
        if calib is None or len(calib) == 0:
            raise QuantError("AWQ needs calibration text: pass --calib FILE (calib= in Python)")
        from dsv3.quant.awq import awq_calibrate

        clips = awq_calibrate(model, calib, group_size, zero_point, progress=progress, **awq_options)
        forced = sum(len(v) for v in clips.forced_experts.values())
        if forced:
            warnings.warn(f"AWQ: {forced} routed expert(s) received no calibration tokens and were calibrated on all "
                          f"tokens (forced routing): {clips.forced_experts}", stacklevel=2)
        model.awq_forced_experts = clips.forced_experts
    if include_lm_head and model.config.tie_word_embeddings:
        untie_lm_head(model)
    targets = quant_targets(model, bool(include_lm_head))
    body = [t for t in targets if t[0] != "lm_head" or not isinstance(include_lm_head, str)]
    groups = group_sizes(model, body, fmt) if fmt.name == "int4" else None
    head_fmt = make_format(include_lm_head, group_size, zero_point, device=model.device) if isinstance(include_lm_head, str) else fmt
    for name, module in tqdm(targets, desc=f"quantizing ({method})", disable=not progress):
        set_module(model, name, convert(module, head_fmt if name == "lm_head" else fmt, None if name == "lm_head" and head_fmt is not fmt
                                        else clips.get(name)))
    embed_spec = None
    if embedding:
        efmt = fmt if embedding == fmt.name else make_format(embedding, group_size, zero_point, device=model.device)
        shared = tied and isinstance(model.lm_head, QuantLinear) and model.lm_head.fmt.name == efmt.name and \
            (efmt.name != "int4" or efmt.group_for(model.config.hidden_size) == model.lm_head.fmt.tensor_group(model.lm_head.tensors))
        quantize_embedding(model, model.lm_head.fmt if shared else efmt, shared_head=shared)
        embed_spec = "lm_head" if shared else efmt.name
        if embed_spec == "int4" and groups is not None and efmt.group_for(model.config.hidden_size) != efmt.group_size:
            groups["model.embed_tokens"] = efmt.group_for(model.config.hidden_size)
    qc = quantization_config(method, fmt, include_lm_head, groups, embed_spec)
    model.config.quantization_config = qc
    ops.invalidate(model)
    return qc


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of all convertible linear / expert weights as currently stored (packed or dense)."""
    total = 0
    for _, m in quant_targets(model, include_lm_head=False):
        total += sum(t.numel() * t.element_size() for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)))
    for name, m in model.named_modules():
        if name.startswith(("model.layers.", "model.mtp.")) and isinstance(m, (QuantLinear, QuantExperts)):
            total += sum(t.numel() * t.element_size() for t in m.buffers(recurse=False))
    return total
