"""`QuantExperts`: routed experts with packed stacked weights (`dsv3.layers.moe.ExpertWeights`).

Gate, up and down projections are stacked per expert ([E, ...] buffers) and quantized separately,
as the checkpoints store them. The MoE layer's one dispatch (`run_experts`) sorts (token, slot)
pairs by expert; a group of rows is then multiplied one of two ways:

* kernel path (int8, int4): PyTorch's packed CPU kernels are 2-D, so it loops over the *active*
  experts only (at most N·K of them — K per decoded token), three packed matmuls each;
* grouped path (fp8, and int8 when many rows share each expert): dequantize only the active
  experts' weights in one vectorized gather and run one `grouped_linear` per projection.

A decode step (a few fp32 tokens) with int8 or int4 experts takes one native call instead
(`dsv3.ops.experts` over their native form: int8 rows, or int4 weights kept in the native kernels' layout).
"""

from __future__ import annotations

import torch

from dsv3.layers.moe import ExpertGroups, Experts, grouped_linear, run_experts
from dsv3.ops.forms import NativeExperts, NativeLinear
from dsv3.quant.formats import Format, PackedModule, Tensors

PROJ = ("gate_proj", "up_proj", "down_proj")


class QuantExperts(PackedModule):
    """E SwiGLU experts; buffers `<proj>.<tensor>` hold the stacked packed weights."""

    grouped_min_rows = 32  # int8: rows per active expert from which dequant + grouped_mm beats the loop

    def __init__(self, fmt: Format, n_experts: int, dim: int, inter: int, tensors: dict[str, Tensors],
                 act_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.fmt, self.n_experts, self.dim, self.inter, self.act_dtype = fmt, n_experts, dim, inter, act_dtype
        self.first, self.count, self.all_reduce = 0, n_experts, None  # every expert, unsharded
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
        kept until `reset_native`; None for FP8, off the CPU, a group that does not allow it, or a parallel shard."""
        if self.all_reduce is not None or self.count != self.n_experts:
            return None
        if self.fmt.name == "int8":
            lins = [NativeLinear(1, getattr(self, f"{p}_qweight"), getattr(self, f"{p}_scale")) for p in PROJ]
            return None if not lins[0].weight.is_cpu else NativeExperts(*lins)
        if self.fmt.name != "int4" or not self.gate_proj_packed.is_cpu:
            return None
        if "_native4" not in self.__dict__:  # tensors only: a deepcopy of the module copies them
            self.__dict__["_native4"] = [self.fmt.native(self.proj(p), *self.shapes[p]) for p in PROJ]
        parts = self.__dict__["_native4"]
        return None if None in parts else NativeExperts(*(NativeLinear(2, t[0], t[1], t[2], t[3]) for t in parts))

    def _mm(self, x: torch.Tensor, proj: str, e: int) -> torch.Tensor:
        return self.fmt.matmul(x, self.proj(proj, e), self.shapes[proj][0])

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, D], idx/weights [N, K] -> Σ_k weights[:, k] · expert_{idx[:, k]}(x), accumulated in fp32."""
        return run_experts(self, x, idx, weights)

    def gate_up(self, x: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
        return self._project(x, ("gate_proj", "up_proj"), groups)

    def down(self, h: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
        return self._project(h, ("down_proj",), groups)

    def _project(self, x: torch.Tensor, projs: tuple[str, ...], groups: ExpertGroups) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # QLoRA: gradients pass through the frozen packed weights
            return _FrozenPacked.apply(x, self, projs, groups)
        return self._matmul(x, projs, groups)

    def _matmul(self, x: torch.Tensor, projs: tuple[str, ...], groups: ExpertGroups) -> torch.Tensor:
        active = groups.active
        if self.fmt.name == "fp8" or (self.fmt.name == "int8" and x.shape[0] >= self.grouped_min_rows * active.numel()):
            offs = groups.counts[active].cumsum(0).to(torch.int32)
            return torch.cat([grouped_linear(x, self.dequant(p, active).to(x.dtype), offs) for p in projs], dim=-1)
        out = x.new_empty(x.shape[0], sum(self.shapes[p][0] for p in projs))
        ends = groups.counts.cumsum(0).tolist()
        for e in active.tolist():
            start = ends[e] - groups.sizes[e]
            xe = x[start:ends[e]]
            out[start:ends[e]] = torch.cat([self._mm(xe, p, e) for p in projs], dim=-1)
        return out

    def dequant(self, proj: str, experts: torch.Tensor) -> torch.Tensor:
        """fp32 weights [len(experts), out, in] of one projection for some experts."""
        return self.fmt.dequant(self.proj(proj, experts), *self.shapes[proj])

    def export(self, e: int) -> dict[str, Tensors]:
        """Checkpoint tensors of expert e, per projection."""
        return {p: self.fmt.export(self.proj(p, e), *self.shapes[p]) for p in PROJ}

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, dim={self.dim}, inter={self.inter}, format={self.fmt.name}"


class _FrozenPacked(torch.autograd.Function):
    """Packed experts' forward; backward dX = Σ_proj dY_proj · W_proj with only the active experts dequantized
    (and dropped again), so gradients reach the hidden states below a frozen quantized MoE."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, experts: QuantExperts, projs: tuple[str, ...], groups: ExpertGroups) -> torch.Tensor:
        ctx.experts, ctx.projs, ctx.groups = experts, projs, groups
        return experts._matmul(x, projs, groups)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        e, groups = ctx.experts, ctx.groups
        active = groups.active
        offs = groups.counts[active].cumsum(0).to(torch.int32)
        widths = [e.shapes[p][0] for p in ctx.projs]
        dx = None
        for p, g in zip(ctx.projs, grad.split(widths, dim=-1)):
            w = e.dequant(p, active).to(grad.dtype)  # [A, out, in]
            part = grouped_linear(g.contiguous(), w.transpose(1, 2).contiguous(), offs)
            dx = part if dx is None else dx + part
        return dx, None, None, None
