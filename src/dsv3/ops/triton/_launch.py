"""Triton as dsv3 uses it: compiled kernels on a GPU, the interpreter on CPU tensors (TRITON_INTERPRET=1).

Triton reads TRITON_INTERPRET when it is imported and when a kernel is decorated, so the kernels run on
CPU tensors only in a process started with TRITON_INTERPRET=1 (`make test-triton`, `pytest -m triton`);
`check_device` says so in one line instead of a compiler error.

Triton's interpreter (3.7.1, the pinned version, and 3.9 alike) has two numeric faults a GPU does not:
it multiplies bfloat16 operands of `tl.dot` as their raw 16-bit patterns (numpy has no bfloat16, the
interpreter stores it as uint16), and its float -> fp8 conversion rounds ties away from zero and loses
the carry when a mantissa rounds up (124.3 -> 64 in e4m3). `fix_interpreter` probes for each once and,
where it is wrong, widens bf16 dot operands to fp32 (what tensor cores compute: a bf16 × bf16 product is
exact in fp32, accumulated in fp32) and converts between float types through PyTorch (round to nearest
even, as the hardware). The kernel source stays the one a GPU runs.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

jit = triton.jit


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(t: torch.Tensor, what: str) -> None:
    """Kernels take CUDA tensors, or CPU tensors in an interpreting process."""
    if t.is_cuda or (t.is_cpu and interpreting()):
        return
    raise RuntimeError(f"{what}: Triton kernels run on CUDA tensors (or on CPU with TRITON_INTERPRET=1), got {t.device}")


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


@jit
def _probe_dot(A, B, O):
    r = tl.arange(0, 16)
    a = tl.load(A + r[:, None] * 16 + r[None, :])
    b = tl.load(B + r[:, None] * 16 + r[None, :])
    tl.store(O + r[:, None] * 16 + r[None, :], tl.dot(a, b))


_TORCH_FLOATS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8e4nv": torch.float8_e4m3fn,
                 "fp8e5": torch.float8_e5m2}
_TORCH_BITS = {8: torch.uint8, 16: torch.int16, 32: torch.int32}


def _rtne():
    from triton._C.libtriton import ir

    return ir.ROUNDING_MODE.RTNE


def _fix_fp8_conversion() -> bool:
    import numpy as np
    from triton.runtime import interpreter as itp

    def probe() -> bool:
        x = np.array([124.3303, 68.0, -21.0, -136.0, 0.0123], dtype=np.float32)
        got = itp._convert_float(x, tl.float32, tl.float8e4nv, _rtne())
        want = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return bool((np.asarray(got).astype(np.uint8) == want).all())

    if probe():
        return False
    original = itp._convert_float

    def convert(input, input_dtype, output_dtype, rounding_mode):
        src, dst = _TORCH_FLOATS.get(input_dtype.name), _TORCH_FLOATS.get(output_dtype.name)
        rtne = rounding_mode is None or "rtne" in str(rounding_mode).lower()
        if src is None or dst is None or not rtne:
            return original(input, input_dtype, output_dtype, rounding_mode)
        t = torch.from_numpy(np.ascontiguousarray(input).copy()).view(_TORCH_BITS[input_dtype.primitive_bitwidth]).view(src)
        out = t.to(dst).view(_TORCH_BITS[output_dtype.primitive_bitwidth]).numpy()
        return out.view(getattr(np, f"uint{output_dtype.primitive_bitwidth}"))

    itp._convert_float = convert
    if not probe():
        raise RuntimeError("Triton's interpreter converts floats to fp8 wrongly and dsv3 could not correct it")
    return True


@functools.cache
def fix_interpreter() -> tuple[bool, bool]:
    """In an interpreting process, correct the interpreter's bf16 dot and fp8 conversion; which were fixed."""
    if not interpreting():
        return False, False
    return _fix_bf16_dot(), _fix_fp8_conversion()


def _fix_bf16_dot() -> bool:
    import numpy as np
    from triton.runtime import interpreter as itp

    def probe() -> bool:
        a = torch.linspace(-2, 2, 256).view(16, 16).to(torch.bfloat16)
        out = torch.zeros(16, 16)
        _probe_dot[(1,)](a, a, out)
        return bool(torch.allclose(out, a.float() @ a.float(), atol=1e-4))

    if probe():
        return False
    original = itp.InterpreterBuilder.create_dot

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return itp.TensorHandle(itp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    itp.InterpreterBuilder.create_dot = create_dot
    if not probe():
        raise RuntimeError("Triton's interpreter computes bf16 tl.dot wrongly and dsv3 could not correct it")
    return True
