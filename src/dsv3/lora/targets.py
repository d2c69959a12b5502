"""How an adapter names what it adapts in `adapter_config.json`: the target regex and per-module patterns.

PEFT re-creates an adapter's modules from the config before loading tensors, so the config must name
exactly the adapted modules (never a bare `gate_proj`, which in the v4 layout also hits every routed
expert) and carry `rank_pattern`/`alpha_pattern` for any module whose rank or scaling differs from `r`/`lora_alpha`.

On transformers v5, PEFT rewrites every `target_modules` entry whose leaf is `gate_proj`/`up_proj`/`down_proj`
into the fused *routed* experts (`_convert_peft_config_moe`), whatever the rest of the name says: a dense MLP's or
the shared experts' adapter would be loaded onto the routed experts (0.56 off the merged model's logits on an
all-MoE model, 3.1 with a dense prefix). So those linears are named by their weights in `target_parameters`
(`model.layers.0.mlp.gate_proj.weight`: PEFT wraps a 2-D parameter like a linear, same tensor names), which that
rewrite leaves alone, and `target_modules` keeps the attention projections and the routed experts.
"""

from __future__ import annotations

import math
import re

import torch

from dsv3.lora.apply import LoRASpec, MLP_TARGETS, lora_modules
from dsv3.lora.layers import ExpertsLoRA, LoRALinear, is_adaptable_linear, lora_scaling
from dsv3.layers.moe import Experts


def mlp_linears(model: torch.nn.Module) -> list[str]:
    """Adapted linears named gate_proj/up_proj/down_proj (dense MLPs, shared experts): PEFT v5 would re-target them."""
    return sorted(n for n, m in lora_modules(model) if isinstance(m, LoRALinear) and n.rsplit(".", 1)[-1] in MLP_TARGETS)


def target_parameters(model: torch.nn.Module) -> list[str] | None:
    """PEFT `target_parameters` for the adapted MLP-named linears (their `.weight`), or None when there are none."""
    return [f"{n}.weight" for n in mlp_linears(model)] or None


def target_regex(model: torch.nn.Module, exclude: set[str] | None = None) -> str | None:
    """A `target_modules` regex (PEFT full-match) naming exactly the adapted modules, `\\d+` per layer where exact;
    None when `exclude` (modules named elsewhere, e.g. in `target_parameters`) leaves nothing.

    Routed experts appear as `experts(\\.\\d+)?\\.gate_proj`, matching both the v4 per-expert modules and the
    v5 name PEFT probes for fused experts (`experts.gate_proj`).
    """
    exclude = exclude or set()
    names, candidates = set(), set()
    for n, m in model.named_modules():
        if n.startswith("model.mtp.") or n.endswith("lm_head"):
            continue
        n0 = n.removesuffix(".base_layer")
        if (isinstance(m, LoRALinear) or is_adaptable_linear(m)) and n0 not in exclude:  # quantized (QLoRA) linears count too
            candidates.add(n0)
        if isinstance(m, LoRALinear) and n not in exclude:
            names.add(n)
        if isinstance(m, Experts) or type(m).__name__ == "QuantExperts":
            candidates.update(f"{n0}.{p}" for p in MLP_TARGETS)
        if isinstance(m, ExpertsLoRA):
            names.update(f"{n}.{p}" for p in m.lora_A)
    groups: dict[str, list[str]] = {}
    for n in sorted(names):
        groups.setdefault(re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n), count=1), []).append(n)
    out = []
    for pattern, members in groups.items():
        hits = sorted(c for c in candidates if re.fullmatch(pattern, c))
        out.extend([pattern] if hits == members else [re.escape(m) for m in members])
    out = [re.sub(r"mlp\\\.experts\\\.(gate_proj|up_proj|down_proj)$", r"mlp\\.experts(\\.\\d+)?\\.\1", t) for t in out]
    return "(" + "|".join(sorted(out)) + ")" if out else None


def scale_patterns(model: torch.nn.Module, spec: LoRASpec) -> tuple[dict, dict]:
    """PEFT rank_pattern / alpha_pattern for modules whose rank or scaling differ from the spec (e.g. loaded ones)."""
    ranks, alphas = {}, {}
    entries = []
    params = set(mlp_linears(model))
    for name, m in lora_modules(model):
        if isinstance(m, LoRALinear):  # (a linear named in target_parameters is matched as `<name>.weight` by PEFT)
            entries.append((re.escape(name) + (r"(\.weight)?" if name in params else ""), m.r, float(m.scaling[0])))
        else:
            entries += [(rf"{re.escape(name)}\.\d+\.{p}", m.lora_A[p].shape[1], m.scaling[p]) for p in m.lora_A]
    for pattern, r, scaling in entries:
        if r != spec.r:
            ranks[pattern] = r
        if not math.isclose(scaling, lora_scaling(spec.alpha, r, spec.use_rslora), rel_tol=1e-6):
            alphas[pattern] = scaling * (math.sqrt(r) if spec.use_rslora else r)
    return ranks, alphas
