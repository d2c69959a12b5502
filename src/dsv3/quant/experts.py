"""`QuantExperts`: routed experts with packed stacked weights, same call signature as `Experts`.

Gate, up and down projections are stacked per expert ([E, ...] buffers) and quantized separately,
as the checkpoints store them. Two execution paths after sorting (token, slot) pairs by expert:

* kernel path (int8, int4): PyTorch's packed CPU kernels are 2-D, so it loops over the *active*
  experts only (at most N·K of them — K per decoded token), three packed matmuls each;
* grouped path (fp8, and int8 when many rows share each expert): dequantize only the active
  experts' weights in one vectorized gather and run one `grouped_linear` per projection.

A decode step (a few fp32 tokens) with int8 or int4 experts takes one native call instead
(`dsv3.ops.experts` over their native form: int8 rows, or int4 weights kept in the native kernels' layout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3 import ops
from dsv3.layers.moe import Experts, grouped_linear
from dsv3.ops.forms import NativeExperts, NativeLinear
from dsv3.quant.formats import Format, Tensors

PROJ = ("gate_proj", "up_proj", "down_proj")


class QuantExperts(nn.Module):
    """E SwiGLU experts; buffers `<proj>.<tensor>` hold the stacked packed weights."""

    grouped_min_rows = 32  # int8: rows per active expert from which dequant + grouped_mm beats the loop

    def __init__(self, fmt: Format, n_experts: int, dim: int, inter: int, tensors: dict[str, Tensors],
                 act_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.fmt, self.n_experts, self.dim, self.inter, self.act_dtype = fmt, n_experts, dim, inter, act_dtype
        self.shapes = {"gate_proj": (inter, dim), "up_proj": (inter, dim), "down_proj": (dim, inter)}
        self.keys: dict[str, list[str]] = {}
        for proj, t in tensors.items():
            self.keys[proj] = list(t)
            for k, v in t.items():
                self.register_buffer(f"{proj}_{k}", v)

    @classmethod
    def from_experts(cls, experts: Experts, fmt: Format, clips: dict[str, torch.Tensor] | None = None) -> "QuantExperts":
        E, two_im, D = experts.gate_up_proj.shape
        Im = two_im // 2
        w = {"gate_proj": experts.gate_up_proj.detach()[:, :Im], "up_proj": experts.gate_up_proj.detach()[:, Im:],
             "down_proj": experts.down_proj.detach()}
        clips = clips or {}
        tensors = {p: fmt.quantize(w[p].contiguous(), clips.get(p)) for p in PROJ}
        return cls(fmt, E, D, Im, tensors, act_dtype=experts.gate_up_proj.dtype)

    def proj(self, proj: str, e: int | torch.Tensor | None = None) -> Tensors:
        """The tensors of one projection, for expert e (int), a set of experts (index tensor), or all."""
        t = {k: getattr(self, f"{proj}_{k}") for k in self.keys[proj]}
        return t if e is None else {k: v[e] for k, v in t.items()}

    def native_form(self) -> NativeExperts | None:
        """int8: the stored stacks (kind 1); int4: converted on first use to the native kernels' layout (kind 2),
        kept until `reset_native`; None for FP8, off the CPU, or a group that does not allow it."""
        if self.fmt.name == "int8":
            lins = [NativeLinear(1, getattr(self, f"{p}_qweight"), getattr(self, f"{p}_scale")) for p in PROJ]
            return None if not lins[0].weight.is_cpu else NativeExperts(*lins)
        if self.fmt.name != "int4" or not self.gate_proj_packed.is_cpu:
            return None
        if "_native4" not in self.__dict__:  # tensors only: a deepcopy of the module copies them
            self.__dict__["_native4"] = [self.fmt.native(self.proj(p), *self.shapes[p]) for p in PROJ]
        parts = self.__dict__["_native4"]
        return None if None in parts else NativeExperts(*(NativeLinear(2, t[0], t[1], t[2], t[3]) for t in parts))

    def _apply(self, fn, recurse: bool = True):
        """`.to()` and friends replace the packed buffers: what was derived from them goes too."""
        out = super()._apply(fn, recurse)
        self.reset_native()
        return out

    def reset_native(self) -> None:
        self.__dict__.pop("_native4", None)

    def _mm(self, x: torch.Tensor, proj: str, e: int) -> torch.Tensor:
        return self.fmt.matmul(x, self.proj(proj, e), self.shapes[proj][0])

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, D], idx/weights [N, K] -> Σ_k weights[:, k] · expert_{idx[:, k]}(x), accumulated in fp32."""
        if self.fmt.name in ("int8", "int4") and ops.native(x):  # decode: one fused call over the packed experts
            y = ops.experts(x, idx, weights, self.native_form())
            if y is not None:
                return y
        N, K = idx.shape
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        token = order // K
        counts = torch.bincount(flat, minlength=self.n_experts)
        xs = x[token]
        active = counts.nonzero().flatten()
        if self.fmt.name == "fp8" or (self.fmt.name == "int8" and N * K >= self.grouped_min_rows * active.numel()):
            y = self._grouped(xs, active, counts[active].cumsum(0).to(torch.int32))
        else:
            y = self._looped(xs, active, counts)
        y = y.float() * weights.flatten()[order, None]
        return torch.zeros(N, x.shape[-1], dtype=torch.float32, device=x.device).index_add_(0, token, y).to(x.dtype)

    def _looped(self, xs: torch.Tensor, active: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        y = xs.new_empty(xs.shape[0], self.dim)
        ends = counts.cumsum(0).tolist()
        for e in active.tolist():
            start = ends[e] - int(counts[e])
            xe = xs[start:ends[e]]
            h = F.silu(self._mm(xe, "gate_proj", e)) * self._mm(xe, "up_proj", e)
            y[start:ends[e]] = self._mm(h, "down_proj", e)
        return y

    def _grouped(self, xs: torch.Tensor, active: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        w = {p: self.fmt.dequant(self.proj(p, active), *self.shapes[p]).to(xs.dtype) for p in PROJ}
        gate = grouped_linear(xs, w["gate_proj"], offs)
        up = grouped_linear(xs, w["up_proj"], offs)
        return grouped_linear(F.silu(gate) * up, w["down_proj"], offs)

    def export(self, e: int) -> dict[str, Tensors]:
        """Checkpoint tensors of expert e, per projection."""
        return {p: self.fmt.export(self.proj(p, e), *self.shapes[p]) for p in PROJ}

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, dim={self.dim}, inter={self.inter}, format={self.fmt.name}"
