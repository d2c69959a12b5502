"""mHC's split and Sinkhorn, side by side: the native `dsv3::hc_sinkhorn` against the layer's PyTorch code.

    python bench/hc_sinkhorn.py [--rows 1,64,2048] [--out bench/results/hc_sinkhorn]

Each V4 block mixes its residual streams through a (2 + n)·n split whose n x n part is made near doubly stochastic by
20 Sinkhorn rounds (`dsv3.layers.hyper.sinkhorn_split`). In PyTorch that is ~120 tensor ops of a few values per call,
whatever the number of rows; the native op is one call. Rows: 1 (a decode step of one sequence: the embedded long
model makes nine such calls a step), 64 (a batched decode step) and 2,048 (a prefill chunk). Both run the same
inputs at the embedded long model's n = 2 (and the released V4's n = 4); every row checks they agree within 1e-5.
Writes results.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dsv3.layers import hyper
from index_topk import native_ready, timed
from long_model_goals import _cpu


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,64,2048")
    p.add_argument("--streams", default="2,4", help="hc_mult values (n)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/hc_sinkhorn")
    a = p.parse_args(argv)
    if not native_ready(a.threads):
        return 1
    g = torch.Generator().manual_seed(0)
    rows, agree = [], True
    print(f"{'n':>2} {'rows':>5} | {'native us':>9} | {'PyTorch us':>10} | {'x':>6}")
    for n in map(int, a.streams.split(",")):
        scale, base = torch.rand(3, generator=g) + 0.5, torch.randn((2 + n) * n, generator=g)
        for m in map(int, a.rows.split(",")):
            mixes = torch.randn(m, (2 + n) * n, generator=g)
            args = (mixes, scale, base, n, a.iters, 1e-6)
            with torch.no_grad():
                nat = timed(hyper.sinkhorn_split, *args)  # no autograd: the native op
                got = hyper.sinkhorn_split(*args)
            with torch.enable_grad():  # with autograd on, the layer runs its PyTorch code
                ref = timed(hyper.sinkhorn_split, *args)
                want = hyper.sinkhorn_split(*args)
            ok = all(torch.allclose(x, y.detach(), atol=1e-5, rtol=1e-5) for x, y in zip(got, want))
            agree &= ok
            rows.append({"n": n, "rows": m, "native_s": nat, "pytorch_s": ref, "speedup": ref / nat, "agree": ok})
            print(f"{n:>2} {m:>5} | {nat * 1e6:>9.1f} | {ref * 1e6:>10.1f} | {ref / nat:>6.1f}" + ("" if ok else "  DIFFER"))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"threads": a.threads, "cpu": _cpu(), "iters": a.iters, "rows": rows},
                                                 indent=1) + "\n")
    print(f"wrote {out / 'results.json'}")
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
