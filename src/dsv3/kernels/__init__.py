"""Native CPU kernels for decode steps, compiled from `decode.c` and `mla.c` on first use.

A batch-1 decode step is bound by weight traffic, but PyTorch spends much of it in per-op overhead
and in small GEMVs that do not reach memory bandwidth (the grouped expert matmul runs one small mm
per expert, ~9 GB/s here). These kernels read each weight row once per step, with one OpenMP region
per call, and run a layer's routed experts, or its whole MLA, in one call. They share PyTorch's OpenMP runtime and
thread count. The C compiler is needed once per machine (the .so is cached under
~/.cache/dsv3/kernels); without one, or with DSV3_KERNELS=0, callers fall back to PyTorch ops.
Where no compiler may be present (a container's runtime image), DSV3_KERNELS_PREBUILT names a
directory of libraries built ahead of time for declared x86-64 levels (`python -m
dsv3.kernels.prebuild`); the most capable one this CPU can run is loaded, else PyTorch ops are used.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

_DIR = Path(__file__).parent
_SOURCES = ["decode.c", "mla.c", "step.c"]
_HEADERS = ["common.h"]
# 512-bit vectors where the CPU has them (GCC prefers 256 for -march=native on recent Xeons): ~1.6x on int8 rows
_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-shared", "-fPIC", "-ffp-contract=fast"]
_lib: ctypes.CDLL | None = None
_tried = False
MAX_EXPERTS, MAX_GROUPS = 1024, 64  # the router kernel's stack arrays (V3: 256 experts in 8 groups)
MAX_ROWS = 8  # tokens per call up to which the kernels are used (decode, MTP verification); more go to PyTorch

_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
_SIGNATURES = {
    "rms_norm_f32": [_P, _P, _P, _L, _L, ctypes.c_float],
    "route_noaux": [_P, _P, _P, _L, _L, _L, _L, _L, _L, _I, ctypes.c_float, _P, _P, _P],
    "linear_lin": [_P, _P, _P, _L, _L, _L, _I],
    "moe_lin": [_P, _P, _P, _P, _P, _P, _P, _P, _L, _L, _L, _L, _I],
    "mlp_decode": [_P, _P, _P, _P, _P, _P, _L, _L, _L, _I],
    "mla_decode": [_P, _P, _L, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _L, _P, _P, _I],
    "decode_layers": [_P, _L, _P, _P, _L, _P, _P, _P, _P, _P, _L, _P, _I],
    "decode_layers_scratch": [_P, _L, _L, _L],
    "decode_step": [_P, _P, _L, _P, _P, _P, _L, _L, _L, _P, _P, _P, _L, _P, _P, _P, _I],
    "decode_step_scratch": [_P, _P, _L, _L, _L],
}
_RESTYPES = {"decode_layers_scratch": _L, "decode_step_scratch": _L, "decode_step": _L}


def _cache_dir() -> Path:
    return Path(os.environ.get("DSV3_CACHE", Path.home() / ".cache" / "dsv3")) / "kernels"


def _sources() -> bytes:
    return b"".join((_DIR / f).read_bytes() for f in _SOURCES + _HEADERS)


def compile_library(cc: str, flags: list[str], so: Path) -> bool:
    """Compile the kernels with `cc` into `so` (atomically replaced); False, with the reason on stderr, on failure."""
    so.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
        out = Path(tmp) / so.name
        res = subprocess.run([cc, *flags, *(str(_DIR / f) for f in _SOURCES), "-o", str(out), "-lm"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            print(f"dsv3: native decode kernels unavailable ({cc} failed): {res.stderr.strip()[:200]}", file=sys.stderr)
            return False
        os.replace(out, so)  # atomic: concurrent builders never load a half-written file
    return True


# x86-64 psABI micro-architecture levels a prebuilt library may target -> the /proc/cpuinfo flags each may use
X86_LEVELS = {
    "x86-64-v3": "sse4_1 sse4_2 ssse3 popcnt cx16 lahf_lm avx avx2 bmi1 bmi2 f16c fma movbe abm xsave",
    "x86-64-v4": "sse4_1 sse4_2 ssse3 popcnt cx16 lahf_lm avx avx2 bmi1 bmi2 f16c fma movbe abm xsave "
                 "avx512f avx512bw avx512cd avx512dq avx512vl",
}


def prebuilt_name(level: str) -> str:
    """File name of a library prebuilt for `level` from exactly these sources (another version's is never loaded)."""
    return f"decode-{hashlib.sha256(_sources()).hexdigest()[:16]}-{level}.so"


def cpu_flags() -> set[str]:
    """This CPU's feature flags as Linux reports them (empty where /proc/cpuinfo has none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def _prebuilt(directory: Path) -> ctypes.CDLL | None:
    """The most capable library in `directory` that was built from these sources and that this CPU can run."""
    have = cpu_flags()
    for level in sorted(X86_LEVELS, key=lambda lv: -len(X86_LEVELS[lv].split())):
        so = directory / prebuilt_name(level)
        if so.exists() and set(X86_LEVELS[level].split()) <= have:
            return _load(so)
    found = sorted(p.name for p in directory.glob("decode-*.so")) if directory.is_dir() else []
    print(f"dsv3: native decode kernels unavailable: no library in {directory} fits these sources and this CPU "
          f"(found: {', '.join(found) or 'none'}); using PyTorch ops", file=sys.stderr)
    return None


def _build() -> ctypes.CDLL | None:
    if os.environ.get("DSV3_KERNELS_PREBUILT"):
        return _prebuilt(Path(os.environ["DSV3_KERNELS_PREBUILT"]))
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    flags = _FLAGS + shlex.split(os.environ.get("DSV3_KERNELS_CFLAGS", ""))  # e.g. -mno-avx512f: the portable code
    key = hashlib.sha256(_sources() + " ".join([cc, *flags, os.uname().machine]).encode()).hexdigest()[:16]
    so = _cache_dir() / f"decode-{key}.so"
    if not so.exists() and not compile_library(cc, flags, so):
        return None
    return _load(so)


def _load(so: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(so))
    for name, args in _SIGNATURES.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = _RESTYPES.get(name)
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built or are switched off."""
    global _lib, _tried
    if not _tried:
        _tried = True
        if os.environ.get("DSV3_KERNELS", "1") != "0":
            try:
                _lib = _build()
            except OSError as e:  # read-only home, missing libgomp, ...
                print(f"dsv3: native decode kernels unavailable: {e}", file=sys.stderr)
    return _lib


def enabled() -> bool:
    """The kernels can run now: built, autograd off, not being traced by torch.compile."""
    if torch.is_grad_enabled() or (_lib is None and (_tried or library() is None)):
        return False
    return not torch.compiler.is_compiling()


def usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """True when a call on activations `x` with `weights` can take a native kernel: few fp32 rows on CPU,
    no autograd, not being compiled, contiguous CPU weights whose floating ones are fp32 (int8 ones as stored).
    Called several times per layer and step, so the cheap tests come first."""
    if not (x.is_cpu and x.dtype == torch.float32 and x.numel() <= MAX_ROWS * x.shape[-1]) or not enabled():
        return False
    return all(w.is_cpu and w.is_contiguous() and (w.dtype == torch.float32 or not w.is_floating_point()) for w in weights)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of fp32 x with an fp32 weight."""
    xc = x.contiguous()
    y = torch.empty_like(xc)
    library().rms_norm_f32(xc.data_ptr(), weight.data_ptr(), y.data_ptr(), xc.numel() // xc.shape[-1], xc.shape[-1], eps)
    return y


class Lin(ctypes.Structure):
    """`Lin` of common.h: kind 0 fp32, 1 int8 (+ row scales), 2 int4 blocks (+ group scales and biases);
    ew / es: expert strides (bytes of weight, floats of scale) for stacked experts."""
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("kind", ctypes.c_long),
                ("group", ctypes.c_long), ("ew", ctypes.c_long), ("es", ctypes.c_long)]


def linear_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] fp32 @ (q [N, K] int8 · scale [N] fp32)ᵀ -> [..., N]."""
    return linear_lin(x, Lin(q.data_ptr(), scale.data_ptr(), None, 1), q.shape[0])


def f32_expert_descs(gate_up: torch.Tensor, down: torch.Tensor) -> tuple[Lin, Lin, Lin]:
    """(gate, up, down) descriptors with expert strides for fp32 experts gate_up [E, 2I, D], down [E, D, I]."""
    I, per_expert = down.shape[-1], gate_up[0].numel() * 4
    return (Lin(gate_up.data_ptr(), None, None, 0, 0, per_expert, 0),
            Lin(gate_up.data_ptr() + I * gate_up.shape[-1] * 4, None, None, 0, 0, per_expert, 0),  # rows I..2I-1
            Lin(down.data_ptr(), None, None, 0, 0, down[0].numel() * 4, 0))


def int8_expert_descs(pairs) -> tuple[Lin, Lin, Lin]:
    """The same for int8 experts given as (qweight, per-row scale) pairs: gate/up [E, I, D], down [E, D, I]."""
    return tuple(Lin(q.data_ptr(), s.data_ptr(), None, 1, 0, q[0].numel(), s[0].numel()) for q, s in pairs)


def moe(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Σ_k weights[:, k] · expert_{idx[:, k]}(x) for x [M, D] fp32, experts gate_up [E, 2I, D], down [E, D, I] fp32."""
    return moe_lin(x, idx, weights, *f32_expert_descs(gate_up, down), down.shape[-1])


def moe_int8(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, gate: tuple[torch.Tensor, torch.Tensor],
             up: tuple[torch.Tensor, torch.Tensor], down: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """`moe` over int8 experts given as (qweight, per-row scale) pairs: gate/up [E, I, D], down [E, D, I]."""
    return moe_lin(x, idx, weights, *int8_expert_descs((gate, up, down)), down[0].shape[-1])


def linear_lin(x: torch.Tensor, desc, out_features: int) -> torch.Tensor:
    """x [..., K] fp32 @ Wᵀ for a `Lin` descriptor (int8, int4 linears) -> [..., N]."""
    K = x.shape[-1]
    xc = x.reshape(-1, K).contiguous()
    y = x.new_empty(*x.shape[:-1], out_features)
    library().linear_lin(ctypes.byref(desc), xc.data_ptr(), y.data_ptr(), xc.shape[0], out_features, K, torch.get_num_threads())
    return y


def moe_lin(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, gate, up, down, inter: int) -> torch.Tensor:
    """`moe` over experts given as `Lin` descriptors with expert strides (any kind)."""
    M, D = x.shape
    K = idx.shape[1]
    xc, ic, wc = x.contiguous(), idx.to(torch.int64).contiguous(), weights.to(torch.float32).contiguous()
    h, y = x.new_empty(M * K, inter), x.new_empty(M, D)
    library().moe_lin(xc.data_ptr(), ic.data_ptr(), wc.data_ptr(), ctypes.byref(gate), ctypes.byref(up), ctypes.byref(down),
                      h.data_ptr(), y.data_ptr(), M, K, D, inter, torch.get_num_threads())
    return y


def route_noaux(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n_group: int, topk_group: int,
                top_k: int, norm: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's sigmoid, bias-corrected, group-limited router for a few tokens x [N, D] fp32.

    Returns (weights [N, K] fp32, expert ids [N, K] int64, scores [N, E] fp32), as `dsv3.layers.moe.Gate`.
    """
    N, D = x.shape
    E = weight.shape[0]
    xc = x.contiguous()
    idx = torch.empty(N, top_k, dtype=torch.int64)
    wt = torch.empty(N, top_k, dtype=torch.float32)
    scores = torch.empty(N, E, dtype=torch.float32)
    library().route_noaux(xc.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), N, D, E,
                          n_group, topk_group, top_k, int(norm), float(scale), idx.data_ptr(), wt.data_ptr(), scores.data_ptr())
    return wt, idx, scores
