"""LoRA layers: y = W x + s · B (A dropout(x)), with W frozen and only A [r, in], B [out, r] trained.

`LoRALinear` wraps an `nn.Linear`, or a `QuantLinear` for QLoRA (the base runs through the packed
kernel, the adapter in fp32). It stores its adapters *stacked* ([slots, r, in], [slots, out, r]) so
that a batch can carry one adapter per sequence or per token (`slot_ids`, a `SlotBatch`): the rows of
each adapter are gathered and multiplied by its own A and B, as Punica/S-LoRA do. Training and
single-adapter inference use slot 0. Routed experts live in `dsv3.lora.experts`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.errors import DSV3Error
from dsv3.layers.grouped import grouped_matmul as grouped
from dsv3.layers.linear import LinearMethod
from dsv3.lora.experts import EXPERT_PROJ, ExpertsLoRA
from dsv3.lora.slots import SlotBatch, as_slot_batch

__all__ = ["EXPERT_PROJ", "AdapterError", "ExpertsLoRA", "LoRALinear", "grouped", "init_lora_", "is_adaptable_linear",
           "lora_scaling"]  # the experts' names are re-exported from dsv3.lora.experts


class AdapterError(DSV3Error):
    """An adapter or its settings do not fit the model (bad target, shape, format or field)."""


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA (arXiv 2312.03732), as PEFT computes it."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def init_lora_(a: torch.Tensor, b: torch.Tensor) -> None:
    """PEFT's default init: A Kaiming-uniform (a=√5, as nn.Linear), B zero — the adapter starts as a no-op."""
    with torch.no_grad():
        for i in range(a.shape[0]):
            nn.init.kaiming_uniform_(a[i], a=math.sqrt(5))
        b.zero_()


def is_adaptable_linear(module: nn.Module) -> bool:
    """A linear layer of any weight format (`LinearMethod`: dense, or weight-only quantized for QLoRA), or a plain
    `nn.Linear`, that is not already adapted."""
    return (isinstance(module, nn.Linear) or isinstance(module, LinearMethod)) and not isinstance(module, LoRALinear)


class LoRALinear(nn.Module):
    """A frozen linear plus low-rank adapters; `dense_weight()` / `lora_terms()` serve MLA's absorbed decode."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 slots: int = 1):
        super().__init__()
        self.base_layer = base
        self.quantized = not isinstance(base, nn.Linear)
        self.r, self.lora_alpha, self.use_rslora = r, alpha, use_rslora
        ref = next(base.buffers()) if self.quantized else base.weight
        # QLoRA: the packed base has no float weight; the adapter (and its optimizer state) stays fp32.
        kw = dict(dtype=torch.float32 if self.quantized else base.weight.dtype, device=ref.device)
        self.lora_A = nn.Parameter(torch.zeros(slots, r, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(slots, base.out_features, r, **kw))
        self.register_buffer("scaling", torch.full((slots,), lora_scaling(alpha, r, use_rslora), device=ref.device),
                             persistent=False)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.slot_ids: SlotBatch | torch.Tensor | None = None  # per-row adapter slots, -1 = base; None = default_slot
        self.default_slot = 0  # the slot used without slot_ids (-1 for served stacks: no adapter unless asked)
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def delta_weight(self, slot: int = 0) -> torch.Tensor:
        """s · B @ A in fp32 ([out, in]); fp32 so merging a bf16 model does not round the product twice."""
        return (self.lora_B[slot].float() @ self.lora_A[slot].float()) * self.scaling[slot].float()

    def forward(self, x: torch.Tensor, slot_ids: SlotBatch | torch.Tensor | None = None) -> torch.Tensor:
        """`slot_ids` overrides `self.slot_ids` for this call (MLA's prefill re-expands one sequence's latents)."""
        y = self.base_layer(x)
        if self.merged:
            return y
        h = self.lora_dropout(x).to(self.lora_A.dtype)
        batch = as_slot_batch(slot_ids if slot_ids is not None else self.slot_ids)
        if batch is None:
            s = self.default_slot
            if s < 0:
                return y
            return y + (F.linear(F.linear(h, self.lora_A[s]), self.lora_B[s]) * self.scaling[s]).to(y.dtype)
        flat = h.reshape(-1, h.shape[-1])
        delta = flat.new_zeros(flat.shape[0], self.out_features)
        for slot, rows in batch.groups(flat.shape[0], flat.device):
            part = F.linear(F.linear(flat if rows is None else flat[rows], self.lora_A[slot]), self.lora_B[slot]) * self.scaling[slot]
            delta = part if rows is None else delta.index_copy_(0, rows, part)  # each row is in one group only
        return y + delta.view(y.shape).to(y.dtype)

    def base_weight(self) -> torch.Tensor:
        """The frozen weight [out, in]; a quantized base is dequantized (and cached by `QuantLinear`)."""
        return self.base_layer.dense_weight() if self.quantized else self.base_layer.weight

    def dense_weight(self) -> torch.Tensor:
        """W + s·BA for the batch's one adapter: what MLA's absorbed attention folds into queries and outputs."""
        w = self.base_weight()
        if self.merged:
            return w
        batch = as_slot_batch(self.slot_ids)
        slot = self.default_slot if batch is None else batch.uniform
        if slot is None:
            raise RuntimeError("a mixed-adapter batch has no single kv_b_proj weight; pass its slots to MLA.attend_absorbed")
        if slot < 0:
            return w
        return (w.float() + self.delta_weight(slot)).to(w.dtype)

    def native_form(self) -> None:
        """No native form: the adapters' deltas run in PyTorch."""
        return None

    def lora_terms(self, slot_ids: SlotBatch | torch.Tensor, rows: int) -> list[tuple[slice | torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(batch rows, A [r, in], B [out, r], s) per adapter present among `rows` batch rows (base rows omitted)."""
        batch = as_slot_batch(slot_ids)
        return [(slice(None) if idx is None else idx, self.lora_A[s], self.lora_B[s], self.scaling[s])
                for s, idx in batch.groups(rows, self.lora_A.device)]

    @torch.no_grad()
    def merge(self) -> None:
        if self.quantized:
            raise AdapterError("an adapter cannot be merged into a quantized layer; merge it into the full-precision "
                               "checkpoint (dsv3 merge) and quantize the result")
        if not self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False
