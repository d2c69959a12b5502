"""Several adapters in one model at once, one slot each, picked per sequence (multi-LoRA serving).

Every targeted linear holds all adapters stacked ([slots, r_max, in], [slots, out, r_max]; a smaller
rank is zero-padded, a module an adapter does not target holds zeros in its slot), and a batch names
each sequence's slot with `set_slot_ids` (-1 = the base model). This is the Punica/S-LoRA gather form,
so requests for different adapters and for the base model share one forward pass. Without slot ids
the stacked model is the base model (`default_slot = -1`). A quantized base (QuantLinear) is wrapped too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from dsv3.lora.apply import AdapterError, lora_modules, replace_module
from dsv3.lora.layers import LoRALinear
from dsv3.lora.peft_io import _PER_EXPERT, _is_linear, module_scaling, read_pairs


def load_stacked(model: torch.nn.Module, adapter_dirs: Sequence[str | Path]) -> list[str]:
    """Load adapters into slots 0..N-1 of the model's linears (routed-expert adapters are refused)."""
    if lora_modules(model):
        raise AdapterError("the model already holds adapters; load stacked adapters into a plain model")
    per_module: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for slot, adapter_dir in enumerate(adapter_dirs):
        cfg, pairs = read_pairs(adapter_dir)
        for path, (a, b) in pairs.items():
            if _PER_EXPERT.match(path) or not _is_linear(model, path):
                raise AdapterError(f"adapter {adapter_dir} targets {path}; only linear layers can be served side by side")
            per_module.setdefault(path, {})[slot] = (a, b, module_scaling(cfg, path, a.shape[0]))
    n = len(adapter_dirs)
    for path, slots in per_module.items():
        base = model.get_submodule(path)
        r = max(a.shape[0] for a, _, _ in slots.values())
        layer = LoRALinear(base, r, float(r), slots=n)
        with torch.no_grad():
            layer.scaling.zero_()
            for slot, (a, b, scaling) in slots.items():
                if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
                    raise AdapterError(f"adapter {adapter_dirs[slot]}: {path} has lora_A {list(a.shape)} / lora_B {list(b.shape)}, "
                                       f"which do not fit a {base.in_features}->{base.out_features} linear")
                layer.lora_A[slot, : a.shape[0]] = a
                layer.lora_B[slot, :, : a.shape[0]] = b
                layer.scaling[slot] = scaling
        layer.requires_grad_(False)
        layer.default_slot = -1  # without slot ids a served stack is the base model
        replace_module(model, path, layer)
    return sorted(per_module)
