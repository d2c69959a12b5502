"""The KV cache: one slot space shared by every layer, each layer's entries laid out by its `CacheSpec`.

Slot s of layer i holds one token's entry for that layer. The engine hands out slots in blocks
(`BlockManager`), a contiguous cache gives sequence b positions [b·max_len, (b+1)·max_len):
either way a step only says which slots it writes (`slot_mapping`) and which it reads. Layers
with the same spec share one tensor [layers, slots, width] (all of DeepSeek-V3's MLA layers do), so
a native whole-step call can address every layer through one tensor. With `quantized`, entries
are int8 with one fp32 scale per part of the spec (MLA: the latent and the rotary key).
"""

from __future__ import annotations

import torch

from dsv3.attention.spec import CacheSpec


class KVCache:
    def __init__(self, specs: list[CacheSpec], num_slots: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 quantized: bool = False):
        if len(set(specs)) != 1:
            raise NotImplementedError("layers with different cache specs need one tensor per spec group")
        self.specs, self.num_slots, self.dtype, self.quantized = list(specs), num_slots, dtype, quantized
        self.spec = specs[0]
        self.parts = self.spec.parts
        self.data = torch.zeros(len(specs), num_slots, self.spec.width, dtype=torch.int8 if quantized else dtype,
                                device=device)
        self.scales = torch.ones(len(specs), num_slots, len(self.parts), dtype=torch.float32, device=device) \
            if quantized else None
        di = self.spec.index_dim  # DSA indexer keys: their own tensor (read for every past token, unlike entries)
        self.index = torch.zeros(len(specs), num_slots, di, dtype=torch.int8 if quantized else dtype, device=device) \
            if di else None
        self.index_scales = torch.ones(len(specs), num_slots, 1, dtype=torch.float32, device=device) \
            if di and quantized else None

    def bytes_per_token(self) -> int:
        return sum(s.bytes_per_token(self.dtype, self.quantized) for s in self.specs)

    def write(self, layer: int, slots: torch.Tensor, values: torch.Tensor) -> None:
        """values [N, width] into `slots` [N] of `layer`."""
        if not self.quantized:
            self.data[layer, slots] = values.to(self.dtype)
            return
        parts = values.float().split(list(self.parts), dim=-1)
        scales = torch.stack([p.abs().amax(-1).clamp(min=1e-8) / 127.0 for p in parts], dim=-1)
        q = torch.cat([(p / scales[:, i:i + 1]).round().clamp(-127, 127) for i, p in enumerate(parts)], dim=-1)
        self.data[layer, slots] = q.to(torch.int8)
        self.scales[layer, slots] = scales

    def write_index(self, layer: int, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """Indexer keys [N, index_dim] into `slots` [N] of `layer`."""
        if not self.quantized:
            self.index[layer, slots] = keys.to(self.dtype)
            return
        scale = keys.float().abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127.0
        self.index[layer, slots] = (keys.float() / scale).round().clamp(-127, 127).to(torch.int8)
        self.index_scales[layer, slots] = scale

    def read_index(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """The indexer keys of `slots` (any shape) of `layer`: [..., index_dim]."""
        if not self.quantized:
            return _gather(self.index[layer], slots)
        return (_gather(self.index[layer], slots).float() * _gather(self.index_scales[layer], slots)).to(self.dtype)

    def read(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """The entries of `slots` (any shape) of `layer`: [..., width] in the cache's compute dtype."""
        if not self.quantized:
            return _gather(self.data[layer], slots)
        q, s = _gather(self.data[layer], slots).float(), _gather(self.scales[layer], slots)
        out, start = [], 0
        for i, n in enumerate(self.parts):
            out.append(q[..., start:start + n] * s[..., i:i + 1])
            start += n
        return torch.cat(out, dim=-1).to(self.dtype)

    def native(self) -> torch.Tensor | None:
        """Every layer's entries as one fp32 CPU tensor [layers, slots, width] for the native kernels, or None."""
        d = self.data
        return d if not self.quantized and d.dtype == torch.float32 and d.is_cpu and d.is_contiguous() else None


def _gather(table: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """`table[slots]` for a [slots, width] table and slots of any shape: one index_select over the flattened slots,
    about twice as fast on CPU as advanced indexing for a decode batch's [rows, context] slots."""
    return table.index_select(0, slots.reshape(-1)).view(*slots.shape, *table.shape[1:])
