"""Which int8 matmul to use for many fp32 rows: PyTorch's int8 kernel (bf16 activations) or a
transient dequantization + one fp32 GEMM (`dsv3.quant.kernels.DEQUANT_MIN_ROWS` picks the switch).

    python bench/int8_prefill.py [--threads 1] [--shapes 8192x256,768x256,256x768]

Prints ms per call for both paths, their ratio and the largest relative error against float64, per
row count. Shapes default to the default model's LM head, dense MLP up and down projections.
"""

from __future__ import annotations

import argparse
import time

import torch


def timed(fn, reps: int = 10) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shapes", default="8192x256,768x256,256x768", help="N x K of the weight, comma-separated")
    ap.add_argument("--rows", default="9,16,64,512")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"{'N x K':>10} {'rows':>5} {'bf16 kernel ms':>15} {'dequant+fp32 ms':>16} {'kernel/dequant':>15} "
          f"{'rel err kernel':>15} {'rel err dequant':>16}")
    for shape in a.shapes.split(","):
        N, K = map(int, shape.split("x"))
        w = torch.randn(N, K)
        scale = w.abs().amax(1) / 127
        q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        for M in map(int, a.rows.split(",")):
            x = torch.randn(M, K)
            ref = x.double() @ (q.double() * scale.double()[:, None]).T
            kern = lambda: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, scale.bfloat16()).float()  # noqa: E731
            deq = lambda: torch.nn.functional.linear(x, q.float() * scale[:, None])  # noqa: E731
            err = [((f().double() - ref).abs().max() / ref.abs().max()).item() for f in (kern, deq)]
            tk, td = timed(kern), timed(deq)
            print(f"{shape:>10} {M:>5} {tk:>15.2f} {td:>16.2f} {tk / td:>14.2f}x {err[0]:>15.1e} {err[1]:>16.1e}")


if __name__ == "__main__":
    main()
