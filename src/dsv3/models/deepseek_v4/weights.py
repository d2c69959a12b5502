"""DeepSeek-V4's checkpoint names onto `DeepseekV4ForCausalLM`'s parameters, in the three layouts one meets.

* Released (DeepSeek's files, the official inference code's names): `embed.weight`, `head.weight`, `norm.weight`,
  `hc_head_{fn,base,scale}`, `layers.N.attn.{wq_a,q_norm,wq_b,wkv,kv_norm,wo_a,wo_b,attn_sink}`,
  `layers.N.attn.compressor.{wkv,wgate,ape,norm}`, `layers.N.attn.indexer.{wq_b,weights_proj}`,
  `layers.N.attn.indexer.compressor.*`, `layers.N.ffn.gate.{weight,bias,tid2eid}`, `layers.N.ffn.experts.E.w{1,2,3}`,
  `layers.N.ffn.shared_experts.w{1,2,3}`, `layers.N.{attn,ffn}_norm`, `layers.N.hc_{attn,ffn}_{fn,base,scale}`, and
  `mtp.K.*` (e_proj, h_proj, enorm, hnorm, norm, hc_head_*, one block; its `emb` / `head` copies are skipped).
  FP8 weights carry a `.scale` (e8m0, 128×128 blocks); routed experts as FP4 (`expert_dtype: fp4`) are int8 with
  two e2m1 values a byte (low nibble first) and a `.scale` per 32 inputs. Both are dequantized on load.
* transformers 5.24's `save_pretrained` (the default, `save_original_format=True`): the released names under a
  `model.` prefix, except `model.embed_tokens.weight`, `head.weight`, `model.hc_head.hc_{fn,base,scale}` and the
  attention's `kv_norm` written as `attn.norm` (its reversal of the `.norm.` -> `.kv_norm.` rename); no MTP.
* transformers' module names (`save_original_format=False`): `model.layers.N.self_attn.q_a_proj`, `.sinks`,
  `self_attn.compressor.{kv_proj,gate_proj,position_bias,kv_norm}`, `self_attn.compressor.indexer.{..., q_b_proj,
  scorer.weights_proj}`, `mlp.experts.{gate_up_proj,down_proj}` (stacked), `attn_hc.fn`, `input_layernorm`, ...

Parameters use the official names under `model.` (`model.layers.3.attn.wq_a.weight`) with the routed experts
stacked (`ffn.experts.gate_up_proj` = w1 then w3, `ffn.experts.down_proj` = w2), the router bias as
`ffn.gate.e_score_correction_bias`, `model.embed_tokens`, `lm_head` and MTP module k under `model.mtp.k`.
`export` writes transformers' save_pretrained layout (plus the MTP modules under their released names).
"""

from __future__ import annotations

import re
from typing import Callable, Iterator

import torch
from torch import nn

from dsv3.models.deepseek_v3 import weights as v3_weights
from dsv3.config import ModelConfig
from dsv3.errors import CheckpointError
from dsv3.io.checkpoint import dequantize_fp8
from dsv3.io.safetensors import SafetensorsFile

Target = tuple[str, tuple]  # internal parameter name, index into it (() = whole tensor)

_EXPERT = re.compile(r"^ffn\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_ATTN_HF = {"q_a_proj": "wq_a", "q_a_norm": "q_norm", "q_b_proj": "wq_b", "kv_proj": "wkv", "kv_norm": "kv_norm",
            "o_a_proj": "wo_a", "o_b_proj": "wo_b", "sinks": "attn_sink"}
_COMP_HF = {"kv_proj": "wkv", "gate_proj": "wgate", "position_bias": "ape", "kv_norm": "norm"}
_SHARED_HF = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_TOP = {"embed.weight": "model.embed_tokens.weight", "embed_tokens.weight": "model.embed_tokens.weight",
        "head.weight": "lm_head.weight", "lm_head.weight": "lm_head.weight", "norm.weight": "model.norm.weight",
        **{f"hc_head_{k}": f"model.hc_head_{k}" for k in ("fn", "base", "scale")},
        **{f"hc_head.hc_{k}": f"model.hc_head_{k}" for k in ("fn", "base", "scale")}}
_HC_HF = re.compile(r"^(attn|ffn)_hc\.(fn|base|scale)$")
_FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
FP4_BLOCK = 32


def _hf_module_name(rest: str) -> str:
    """A layer's tensor under transformers' module names -> its official name (other names pass unchanged)."""
    parts = rest.split(".")
    if parts[0] == "self_attn":
        p = parts[1:]
        if p[0] == "compressor" and p[1] == "indexer":
            if p[2] == "scorer":
                return ".".join(["attn", "indexer", *p[3:]])
            if p[2] == "q_b_proj":
                return ".".join(["attn", "indexer", "wq_b", *p[3:]])
            return ".".join(["attn", "indexer", "compressor", _COMP_HF.get(p[2], p[2]), *p[3:]])
        if p[0] == "compressor":
            return ".".join(["attn", "compressor", _COMP_HF.get(p[1], p[1]), *p[2:]])
        return ".".join(["attn", _ATTN_HF.get(p[0], p[0]), *p[1:]])
    if parts[0] == "mlp":
        p = parts[1:]
        if p[0] == "shared_experts":
            return ".".join(["ffn", "shared_experts", _SHARED_HF.get(p[1], p[1]), *p[2:]])
        return ".".join(["ffn", *p])
    if parts[0] in ("input_layernorm", "post_attention_layernorm"):
        return ".".join(["attn_norm" if parts[0] == "input_layernorm" else "ffn_norm", *parts[1:]])
    m = _HC_HF.match(rest)
    if m:
        return f"hc_{m.group(1)}_{m.group(2)}"
    return rest


def _layer(rest: str, cfg: ModelConfig) -> Target:
    """A tensor of one block (any layout) -> (name within the block, index)."""
    rest = _hf_module_name(rest)
    if rest == "attn.norm.weight":  # transformers' save_pretrained spelling of the attention's kv_norm
        rest = "attn.kv_norm.weight"
    if rest == "ffn.gate.bias":
        return "ffn.gate.e_score_correction_bias", ()
    e = _EXPERT.match(rest)
    if e:
        j, w, Im = int(e.group(1)), e.group(2), cfg.moe_intermediate_size
        if w == "w2":
            return "ffn.experts.down_proj", (j,)
        return "ffn.experts.gate_up_proj", (j, slice(0, Im) if w == "w1" else slice(Im, 2 * Im))
    return rest, ()


def is_scale(name: str) -> bool:
    """A quantization scale read with its weight (`.scale` as released, `weight_scale_inv` as transformers writes),
    not transformers' mHC `attn_hc.scale` / `ffn_hc.scale`."""
    return name.endswith("weight_scale_inv") or (name.endswith(".scale") and not re.search(r"_hc\.scale$", name))


def map_name(name: str, cfg: ModelConfig, with_mtp: bool) -> Target | None:
    """Checkpoint tensor name (any of the three layouts) -> (model parameter name, index), or None to skip it."""
    if is_scale(name):
        return None
    s = name.removeprefix("model.")
    if s in _TOP:
        return _TOP[s], ()
    m = re.match(r"^mtp\.(\d+)\.(.*)$", s)
    if m is not None:
        k, rest = int(m.group(1)), m.group(2)
    else:
        m = re.match(r"^layers\.(\d+)\.(.*)$", s)
        if m is None:
            return name, ()  # unknown: the loader reports it
        i, rest = int(m.group(1)), m.group(2)
        if i < cfg.num_hidden_layers:
            sub, idx = _layer(rest, cfg)
            return f"model.layers.{i}.{sub}", idx
        k = i - cfg.num_hidden_layers  # MTP module k stored as layer L + k
    if not with_mtp or k >= cfg.num_nextn_predict_layers:
        return None
    first = rest.split(".")[0]
    if "emb" in first or first in ("head", "shared_head", "lm_head"):
        return None  # the MTP module's copies of the shared embedding and head
    sub, idx = _layer(rest, cfg)
    return f"model.mtp.{k}.{sub}", idx


pieces = v3_weights.pieces  # experts are stacked from per-expert files as in V3


def mtp_probe(cfg: ModelConfig) -> str:
    """A tensor every checkpoint with the MTP modules has (transformers' save_pretrained drops them)."""
    return "mtp.0.e_proj.weight"


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, name: str) -> torch.Tensor:
    """FP4 e2m1 [out, in/2] bytes (low nibble = even input) with one scale per 32 inputs [out, in/32] -> fp32 [out, in]."""
    out, half = packed.shape
    if tuple(scale.shape) != (out, 2 * half // FP4_BLOCK):
        raise CheckpointError(f"tensor {name!r}: FP4 scale shape {list(scale.shape)} does not match "
                              f"[{out}, {2 * half // FP4_BLOCK}] (one scale per {FP4_BLOCK} values)")
    b = packed.view(torch.uint8).long()
    vals = _FP4[torch.stack([b & 0xF, b >> 4], dim=-1)].flatten(1)
    return vals * scale.float().repeat_interleave(FP4_BLOCK, dim=1)


def read_tensor(sf: SafetensorsFile, name: str, cfg: ModelConfig) -> torch.Tensor:
    """A tensor as stored, or dequantized to fp32: FP8 e4m3 with a 128×128-block `.scale` / `weight_scale_inv`, or
    packed FP4 (int8 / uint8 with a per-32 `.scale`)."""
    src = sf.get(name)
    if not name.endswith("weight"):
        return src
    scale = next((s for s in (name.removesuffix("weight") + "scale", name + "_scale_inv") if s in sf.entries), None)
    if src.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        if scale is None:
            raise CheckpointError(f"{sf.path.name}: FP8 tensor {name!r} has no scale tensor")
        block = tuple((cfg.quantization_config or {}).get("weight_block_size") or (128, 128))
        out = dequantize_fp8(src, sf.get(scale), block, name)
    elif src.dtype in (torch.int8, torch.uint8) and scale is not None:
        out = dequantize_fp4(src, sf.get(scale), name)
    else:
        return src
    sf.release(scale)
    return out


def _block_out(sub: str) -> str:
    """transformers' save_pretrained spelling of a block tensor (the attention's kv_norm as `attn.norm`)."""
    return "attn.norm.weight" if sub == "attn.kv_norm.weight" else sub


def export(model: nn.Module) -> Iterator[tuple[str, Callable[[], torch.Tensor], int]]:
    """(checkpoint name, producer, byte size) in transformers' save_pretrained layout, the MTP modules as released
    (`mtp.k.*`, which transformers ignores): routed experts per expert (w1, w3, w2), the router bias as `gate.bias`."""
    cfg, Im = model.config, model.config.moe_intermediate_size
    renamed = {"lm_head.weight": "head.weight", **{f"model.hc_head_{k}": f"model.hc_head.hc_{k}"
                                                     for k in ("fn", "base", "scale")}}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        m = re.match(r"^model\.(layers|mtp)\.(\d+)\.(.*)$", name)
        if m is None:
            yield renamed.get(name, name), (lambda t=t: t.contiguous()), t.nbytes
            continue
        kind, i, sub = m.groups()
        prefix = f"model.layers.{i}." if kind == "layers" else f"mtp.{i}."
        sub = _block_out(sub) if kind == "layers" else sub
        if sub == "ffn.gate.e_score_correction_bias":
            yield prefix + "ffn.gate.bias", (lambda t=t: t.contiguous()), t.nbytes
        elif sub in ("ffn.experts.gate_up_proj", "ffn.experts.down_proj"):
            for j in range(t.shape[0]):
                if sub.endswith("down_proj"):
                    yield f"{prefix}ffn.experts.{j}.w2.weight", (lambda t=t, j=j: t[j].contiguous()), t[j].nbytes
                else:
                    yield f"{prefix}ffn.experts.{j}.w1.weight", (lambda t=t, j=j: t[j, :Im].contiguous()), t[j].nbytes // 2
                    yield f"{prefix}ffn.experts.{j}.w3.weight", (lambda t=t, j=j: t[j, Im:].contiguous()), t[j].nbytes // 2
        else:
            yield prefix + sub, (lambda t=t: t.contiguous()), t.nbytes
