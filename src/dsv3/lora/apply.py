"""Putting adapters into a model and taking them out again: inject, merge, unload.

Targets are named by the HF linear names (`q_a_proj`, `kv_b_proj`, `gate_proj`, ...) or by a full module
path. A leaf name reaches the MLA projections, the dense MLPs and the shared experts; routed experts
are adapted only with `routed_experts=True` (`experts.gate_proj` etc. name them alone), because by name they would silently multiply the adapter
size by the expert count (and PEFT-on-transformers-v5 maps `gate_proj` to them alone). The router, its
bias, embeddings and the LM head are never adapted. MTP modules are left alone: PEFT's view of the
model (transformers) has none.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dsv3 import ops
from dsv3.lora.layers import AdapterError, ExpertsLoRA, LoRALinear, init_lora_, is_adaptable_linear, lora_scaling
from dsv3.lora.slots import SlotBatch
from dsv3.layers.moe import Experts
from dsv3.models.deepseek_v3.family import MLA_TARGETS, MLP_TARGETS

# The DeepSeek family's adaptable modules (every registered family shares them today)
DEFAULT_TARGETS = MLA_TARGETS + MLP_TARGETS
REFUSED = ("gate", "lm_head", "embed_tokens", "e_score_correction_bias", "eh_proj")


@dataclass
class LoRASpec:
    """The adapter's hyper-parameters; `lora_alpha=None` means 2·r (LLaMA-Factory's default)."""

    r: int = 64
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    use_rslora: bool = False
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    routed_experts: bool = False

    @property
    def alpha(self) -> float:
        return float(2 * self.r if self.lora_alpha is None else self.lora_alpha)

    def check(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise AdapterError(f"lora_rank must be a positive integer, got {self.r!r}")
        if self.alpha <= 0:
            raise AdapterError(f"lora_alpha must be positive, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise AdapterError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        bad = [t for t in self.target_modules if t.rsplit(".", 1)[-1] in REFUSED]
        if bad:
            raise AdapterError(f"target module {bad[0]!r} cannot be adapted (router, embedding, LM head and MTP projection are excluded)")


def _is_mtp(name: str) -> bool:
    return name.startswith("model.mtp.")


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)
    ops.invalidate()  # plans built before hold the replaced module's tensors


def inject_lora(model: nn.Module, spec: LoRASpec, init: bool = True) -> list[str]:
    """Wrap the targeted linears (and, opt-in, routed experts); freeze everything else. Returns the names."""
    spec.check()
    scaling = lora_scaling(spec.alpha, spec.r, spec.use_rslora)
    done: list[str] = []
    for name, module in list(model.named_modules()):
        if _is_mtp(name):
            continue
        if is_adaptable_linear(module) and not name.endswith("lm_head") and _matches(name, spec.target_modules):
            if ".experts." in name:
                continue
            wrapped = LoRALinear(module, spec.r, spec.alpha, spec.lora_dropout, spec.use_rslora)
            if init:
                init_lora_(wrapped.lora_A.data, wrapped.lora_B.data)
            replace_module(model, name, wrapped)
            done.append(name)
        elif spec.routed_experts and type(module).__name__ == "QuantExperts":
            raise AdapterError(f"{name}: routed-expert adapters need full-precision experts (not supported with quantization)")
        elif isinstance(module, Experts) and spec.routed_experts:
            projs = [p for p in MLP_TARGETS if p in spec.target_modules or f"experts.{p}" in spec.target_modules]
            wrapped = ExpertsLoRA(module, {p: (spec.r, scaling) for p in projs}, spec.lora_dropout)
            if init:
                for p in projs:
                    init_lora_(wrapped.lora_A[p].data, wrapped.lora_B[p].data)
            replace_module(model, name, wrapped)
            done.append(name)
    routed = [f"experts.{p}" for p in MLP_TARGETS] if spec.routed_experts else []
    unknown = [t for t in spec.target_modules if t not in DEFAULT_TARGETS + tuple(routed) and not any(_matches(n, [t]) for n in done)]
    if unknown:
        hint = " (routed experts need routed_experts: true)" if unknown[0].startswith("experts.") else ""
        raise AdapterError(f"target module {unknown[0]!r} matches no linear layer of this model{hint}")
    if not done:
        raise AdapterError(f"no module of the model matches target_modules {spec.target_modules}")
    mark_trainable(model)
    return done


def wrap_frozen_experts(model: nn.Module) -> None:
    """Give every plain `Experts` an autograd-safe wrapper without adapters (CPU training needs it)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Experts) and not _is_mtp(name) and not name.endswith(".base_layer"):
            replace_module(model, name, ExpertsLoRA(module, {}))


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear | ExpertsLoRA]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, ExpertsLoRA))]


def mark_trainable(model: nn.Module) -> list[nn.Parameter]:
    """Only LoRA A/B train; returns them in a stable order (optimizer state must line up on resume)."""
    params = []
    for name, p in model.named_parameters():
        is_lora = ".lora_A" in name or ".lora_B" in name
        p.requires_grad_(is_lora)
        if is_lora:
            params.append(p)
    return params


def set_merged(model: nn.Module, merged: bool) -> None:
    for _, m in lora_modules(model):
        m.merge() if merged else m.unmerge()


def set_slot_ids(model: nn.Module, slot_ids: SlotBatch | torch.Tensor | None) -> None:
    """Adapter slot per sequence ([B]) or per token ([N]) for every LoRA linear (-1 = the base model).

    None = each layer's `default_slot`. One `SlotBatch` is shared by all layers, so the rows of each
    adapter are grouped once per batch rather than once per layer.
    """
    batch = slot_ids if slot_ids is None or isinstance(slot_ids, SlotBatch) else SlotBatch(slot_ids)
    for _, m in lora_modules(model):
        if isinstance(m, LoRALinear):
            m.slot_ids = batch


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every wrapper by its base module (adapters merged in first unless `merge=False`)."""
    for name, m in lora_modules(model):
        if merge:
            m.merge()
        replace_module(model, name, m.base_layer)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
