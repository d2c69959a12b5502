"""DeepSeek-V3's checkpoint names, as Hugging Face writes them, onto `DeepseekV3ForCausalLM`'s parameters.

Parameter names equal the checkpoint's except that routed experts are stacked per layer
(`model.layers.3.mlp.experts.7.gate_proj.weight` is rows [0, I) of expert 7 in
`model.layers.3.mlp.experts.gate_up_proj`) and MTP module k, stored as layer
`num_hidden_layers + k`, lives in `model.mtp.k` (its decoder block under `.block.`).
"""

from __future__ import annotations

import re
from typing import Callable, Iterator

import torch
from torch import nn

from dsv3.config import ModelConfig

_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_MTP_OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.norm.")
_MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

Target = tuple[str, tuple]  # internal parameter name, index into it (() = whole tensor)
Target = tuple[str, tuple]  # internal parameter name, index into it (() = whole tensor)


def map_name(name: str, cfg: ModelConfig, with_mtp: bool) -> Target | None:
    """Checkpoint tensor name -> (model parameter name, index), or None to skip it."""
    L = cfg.num_hidden_layers
    m = _LAYER.match(name)
    if m and int(m.group(1)) >= L:
        k, rest = int(m.group(1)) - L, m.group(2)
        if not with_mtp or k >= cfg.num_nextn_predict_layers or rest in _MTP_SHARED:
            return None
        prefix = f"model.mtp.{k}." if rest.startswith(_MTP_OWN) else f"model.mtp.{k}.block."
        mapped = map_name(f"model.layers.0.{rest}", cfg, with_mtp)
        if mapped is None:
            return None
        return prefix + mapped[0].removeprefix("model.layers.0."), mapped[1]
    e = _EXPERT.match(name)
    if e:
        base, j, proj = e.group(1), int(e.group(2)), e.group(3)
        Im = cfg.moe_intermediate_size
        if proj == "down_proj":
            return f"{base}.down_proj", (j,)
        rows = slice(0, Im) if proj == "gate_proj" else slice(Im, 2 * Im)
        return f"{base}.gate_up_proj", (j, rows)
    return name, ()


def pieces(name: str, cfg: ModelConfig) -> int:
    """How many checkpoint tensors fill one model tensor (per-expert files fill stacked experts)."""
    if name.endswith("experts.gate_up_proj"):
        return 2 * cfg.n_routed_experts
    if name.endswith("experts.down_proj"):
        return cfg.n_routed_experts
    return 1


def mtp_probe(cfg: ModelConfig) -> str:
    """A tensor every checkpoint that stores the MTP modules has (HF's save_pretrained drops them)."""
    return f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight"


def export(model: nn.Module) -> Iterator[tuple[str, Callable[[], torch.Tensor], int]]:
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
