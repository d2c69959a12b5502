"""Pre-quantized int4 checkpoints made by other tools, read into dsv3's int4 format (kept packed, run by the int4 kernels).

Three packings, chosen by `quantization_config.quant_method`; each module of the checkpoint is converted to
dsv3's int4 tensors (`weight_packed` nibbles [N, K/2], `weight_scale` fp32 [N, G], `weight_zero_point`
uint8 [N, G], w = (u − z)·s), after which `Int4Format.load` packs it for the kernels like any dsv3 file:

| quant_method | tensors per linear | layout |
|---|---|---|
| `awq` (AutoAWQ, `version: gemm`) | `qweight` int32 [K, N/8], `qzeros` int32 [K/g, N/8], `scales` fp16 [K/g, N] | 8 nibbles along N per int32 in AutoAWQ's interleaved order (0, 2, 4, 6, 1, 3, 5, 7); w = (q − z)·s |
| `gptq` (AutoGPTQ / GPTQModel, `desc_act: false`) | `qweight` int32 [K/8, N], `qzeros` int32 [K/g, N/8], `scales` fp16 [K/g, N], `g_idx` int32 [K] | qweight: 8 nibbles along K, qzeros: along N, in order; zeros stored minus one (`gptq_v2`: as is) |
| `compressed-tensors` (`format: pack-quantized`, int4 groups) | `weight_packed` int32 [N, K/8], `weight_scale` [N, K/g], `weight_shape` [2], asymmetric: `weight_zero_point` int32 [N/8, K/g] | 8 nibbles along K (zero points along N), each value stored + 8 (signed → unsigned); w = (q − zp)·s |

A module is quantized exactly when its checkpoint holds the packing's weight tensor (`qweight` or
`weight_packed`); the rest (AutoAWQ's `modules_to_not_convert`, compressed-tensors' `ignore`) load dense.
Anything else a config can say — another bit width, act-order, an unknown `version` or `format` — is refused
with one line naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3.quant.schemes import INT4_GROUP_SIZES, QuantError, pack_nibbles

FOREIGN_METHODS = ("awq", "gptq", "compressed-tensors")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ GEMM: nibble i of an int32 holds column 8c + AWQ_ORDER[i]
Tensors = dict[str, torch.Tensor]


def unpack_int32(p: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words -> their 8 nibbles (uint8, 0..15), nibble i (bits 4i..4i+3) at position 8j + i along `dim`."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    u = (p.to(torch.int32).unsqueeze(-1) >> shifts) & 15  # [..., 8] along a new last dim
    u = u.to(torch.uint8)
    if dim in (-1, p.dim() - 1):
        return u.flatten(-2)
    return u.movedim(-1, dim + 1).flatten(dim, dim + 1)


def _expect(d: Tensors, name: str, key: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    if key not in d:
        raise QuantError(f"tensor {name}.{key} is missing from the quantized checkpoint")
    t = d[key]
    if t.dtype not in dtypes or tuple(t.shape) != tuple(shape):
        want = "/".join(str(x).removeprefix("torch.") for x in dtypes)
        raise QuantError(f"tensor {name}.{key} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, expected {want} {list(shape)}")
    return t


def _int4(u: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, name: str) -> Tensors:
    """dsv3 int4 checkpoint tensors from values u [N, K], scale [N, G] and zero points [N, G] (all 0..15)."""
    s = scale.float()
    if not torch.isfinite(s).all():
        raise QuantError(f"tensor {name}: scales hold non-finite values")
    return {"weight_packed": pack_nibbles(u.contiguous()), "weight_scale": s.contiguous(),
            "weight_zero_point": zero.to(torch.uint8).contiguous()}


@dataclass(frozen=True)
class ForeignInt4:
    """One foreign int4 packing: its tensor names and a converter to dsv3's int4 checkpoint tensors."""

    method: str
    group_size: int
    zero_point: bool
    ckpt_keys: tuple[str, ...]
    probe: str  # the tensor whose presence marks a quantized module
    zeros_minus_one: bool = True  # GPTQ v1 stores zero points minus one

    def to_int4(self, d: Tensors, out_features: int, in_features: int, name: str) -> Tensors:
        N, K, g = out_features, in_features, self.group_size
        if K % g or K % 8 or N % 8:
            raise QuantError(f"{name}: a {K}->{N} matrix does not fit {self.method}'s packing in groups of {g}")
        G = K // g
        if self.method == "awq":
            qw = _expect(d, name, "qweight", (K, N // 8), (torch.int32,))
            qz = _expect(d, name, "qzeros", (G, N // 8), (torch.int32,))
            sc = _expect(d, name, "scales", (G, N), (torch.float16, torch.bfloat16, torch.float32))
            undo = torch.tensor([AWQ_ORDER.index(i) for i in range(8)])  # column 8c + i sits in nibble undo[i]

            def cols(p: torch.Tensor) -> torch.Tensor:
                u = unpack_int32(p, -1).unflatten(-1, (-1, 8))
                return u[..., undo].flatten(-2)
            return _int4(cols(qw).t(), sc.t(), cols(qz).t(), name)
        if self.method == "gptq":
            qw = _expect(d, name, "qweight", (K // 8, N), (torch.int32,))
            qz = _expect(d, name, "qzeros", (G, N // 8), (torch.int32,))
            sc = _expect(d, name, "scales", (G, N), (torch.float16, torch.bfloat16, torch.float32))
            if "g_idx" in d:
                gi = _expect(d, name, "g_idx", (K,), (torch.int32, torch.int64))
                if not torch.equal(gi.long(), torch.arange(K) // g):
                    raise QuantError(f"{name}.g_idx is not in order: act-order (desc_act) GPTQ checkpoints are not supported")
            z = unpack_int32(qz, -1).int() + (1 if self.zeros_minus_one else 0)
            if (z > 15).any():
                raise QuantError(f"{name}.qzeros hold a zero point above 15")
            return _int4(unpack_int32(qw, 0).t(), sc.t(), z.t(), name)
        # compressed-tensors pack-quantized
        qw = _expect(d, name, "weight_packed", (N, K // 8), (torch.int32,))
        sc = _expect(d, name, "weight_scale", (N, G), (torch.float16, torch.bfloat16, torch.float32))
        if "weight_shape" in d and [int(v) for v in d["weight_shape"].flatten()] != [N, K]:
            raise QuantError(f"{name}.weight_shape is {d['weight_shape'].tolist()}, the model expects {[N, K]}")
        if self.zero_point:
            zp = _expect(d, name, "weight_zero_point", (N // 8, G), (torch.int32,))
            z = unpack_int32(zp, 0)
        else:
            z = torch.full((N, G), 8, dtype=torch.uint8)
        return _int4(unpack_int32(qw, -1), sc, z, name)


def foreign_scheme(qc: dict) -> ForeignInt4:
    """The packing a `quantization_config` of AutoAWQ, GPTQ or compressed-tensors declares (QuantError otherwise)."""
    method = qc.get("quant_method")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise QuantError(f"config.json: AWQ version {version!r} is not supported (dsv3 reads AutoAWQ's GEMM packing)")
        bits, g, zp = qc.get("bits", qc.get("w_bit")), qc.get("group_size", qc.get("q_group_size")), qc.get("zero_point", True)
        keys = ("qweight", "qzeros", "scales")
    elif method == "gptq":
        if qc.get("desc_act"):
            raise QuantError("config.json: GPTQ with desc_act (act-order) is not supported; quantize with desc_act=false")
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise QuantError(f"config.json: GPTQ checkpoint_format {fmt!r} is not supported (gptq or gptq_v2)")
        bits, g, zp = qc.get("bits"), qc.get("group_size"), not qc.get("sym", True)
        return _checked(ForeignInt4("gptq", g, True, ("qweight", "qzeros", "scales", "g_idx"), "qweight",
                                    zeros_minus_one=fmt == "gptq"), bits)
    elif method == "compressed-tensors":
        if qc.get("format") != "pack-quantized":
            raise QuantError(f"config.json: compressed-tensors format {qc.get('format')!r} is not supported (dsv3 reads "
                             "pack-quantized int4)")
        groups = [c for c in (qc.get("config_groups") or {}).values() if isinstance(c, dict)]
        if len(groups) != 1 or not isinstance(groups[0].get("weights"), dict):
            raise QuantError("config.json: compressed-tensors with other than one config group of weights is not supported")
        w = groups[0]["weights"]
        if groups[0].get("input_activations"):
            raise QuantError("config.json: compressed-tensors with quantized activations is not supported (weight-only int4 is)")
        if w.get("type", "int") != "int" or w.get("strategy") != "group" or w.get("actorder"):
            raise QuantError(f"config.json: compressed-tensors weights {w.get('type')}/{w.get('strategy')} "
                             f"(actorder {w.get('actorder')}) are not supported (int, group, no actorder)")
        bits, g, zp = w.get("num_bits"), w.get("group_size"), not w.get("symmetric", True)
        keys = ("weight_packed", "weight_scale", "weight_shape") + (("weight_zero_point",) if zp else ())
        return _checked(ForeignInt4(method, g, zp, keys, "weight_packed"), bits)
    else:
        raise QuantError(f"config.json: quant_method {method!r} is not a foreign int4 packing ({', '.join(FOREIGN_METHODS)})")
    return _checked(ForeignInt4("awq", g, bool(zp), keys, "qweight"), bits)


def _checked(scheme: ForeignInt4, bits) -> ForeignInt4:
    if bits != 4:
        raise QuantError(f"config.json: {scheme.method} with {bits} bits is not supported (dsv3's kernels take 4-bit weights)")
    if scheme.group_size not in INT4_GROUP_SIZES:
        raise QuantError(f"config.json: {scheme.method} group size {scheme.group_size} is not supported "
                         f"(the int4 kernels take {', '.join(map(str, INT4_GROUP_SIZES))})")
    return scheme
