"""DSA's indexer top-k, side by side: the native `dsv3::index_topk` against the same selection in PyTorch ops.

    python bench/index_topk.py [--sizes 1024,4096,16384,65536,262144] [--out bench/results/index_topk]

Each query of a V3.2/V4 sparse layer scores every compressed entry it may see, Σ_h w_h·relu(q_h·k_s), and keeps
the top k. Three implementations choose the same entries:
  native       `dsv3::index_topk` (csrc/index.c): tiles of entries scored in registers, each query's
               candidates cut back to its k best as they come;
  PyTorch      the model's own PyTorch path, which runs where the native op does not and ran everywhere before
               it (`TorchBackend.index_scores`: a chunked bmm, relu, a weighting matmul into [T, S] scores; then
               `topk_select`);
  transformers the formulation of transformers' DeepSeek-V4 indexer: one matmul into [B, T, H, S], relu, weights,
               sum over heads, then `topk` (no tie rule).
Shapes: the embedded long model's indexer (4 heads of 32, top 64) for a prefill chunk of 256 queries and a decode
step of one, at entry counts up to 262,144 (a 1M-token context at CSA's 4:1), and the released V4's (64 heads of
128, top 512) at a few sizes. Every row checks that the native op's chosen set equals the PyTorch path's. The
machine's bound: the indexer is 2·H·D flops per query-entry pair, all multiply-adds, so it cannot beat the fp32
FMA peak, threads x nominal clock x flops per cycle (AVX-512: 64 on Intel and on AMD from Zen 5, family 26; 32 on
Zen 4's double-pumped units and with AVX2; boost clocks can pass the nominal one). torch's own fp32 GEMM rate (a
2048³ matmul) is printed beside it. A decode step (one query) is bound instead by reading every index key once:
S·D·4 bytes at the streaming bandwidth `roofline.stream_bandwidth` measures (the "bound ms" of the T = 1 rows).
Writes results.json and index_topk.png (time per query-entry pair).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dsv3 import kernels
from dsv3.attention.backend import TorchBackend
from long_model_goals import _cpu  # the bench scripts' CPU name
from roofline import stream_bandwidth


def transformers_style(q, w, keys, n_visible, k):
    """transformers' DeepSeek-V4 indexer: scores [B, T, H, S] at once, relu, weighted sum over heads, topk."""
    scores = torch.nn.functional.relu(torch.matmul(q.float(), keys.float().transpose(-1, -2)[:, None]))
    scores = (scores * w.float()[..., None]).sum(dim=2)
    valid = torch.arange(keys.shape[1]) < n_visible[..., None]
    return scores.masked_fill(~valid, float("-inf")).topk(min(k, keys.shape[1]), dim=-1).indices


def pytorch_path(q, w, keys, n_visible, k):
    """What the model runs without the native op: TorchBackend's chunked scores, then its tie-stable top-k."""
    be = TorchBackend()
    valid = torch.arange(keys.shape[1]) < n_visible[..., None]
    return be.topk_select(be.index_scores(q, w, keys), valid, k)


def native_ready(threads: int) -> bool:
    """Set the threads and load the native library; say so and return False without it (nothing to compare)."""
    torch.set_num_threads(threads)
    if kernels.load():
        return True
    print("error: the native library did not load (no C compiler?): nothing to compare")
    return False


def timed(fn, *args, budget: float = 2.0) -> float:
    """Median seconds of a call, repeated until `budget` seconds or 5 calls, after one warm-up."""
    fn(*args)
    times = []
    while len(times) < 5 and sum(times) < budget:
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def fma_peak(threads: int) -> tuple[float, str]:
    """(GFLOP/s, how) of fp32 FMA at the nominal clock on `threads` cores, from /proc/cpuinfo."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    field = lambda k: next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith(k)), "")  # noqa: E731
    flags, mhz = set(field("flags").split()), float(field("cpu MHz") or 0)
    amd, family = field("vendor_id") == "AuthenticAMD", int(field("cpu family") or 0)
    per_cycle = (64 if not amd or family >= 26 else 32) if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 8
    return threads * mhz / 1e3 * per_cycle, f"{threads} x {mhz / 1e3:.2f} GHz x {per_cycle} flops/cycle"


def gemm_rate() -> float:
    """torch's fp32 GEMM rate (GFLOP/s) on the threads set now."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048 ** 3 / timed(torch.mm, a, b) / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1024,4096,16384,65536,262144", help="entry counts for the long model's shape")
    p.add_argument("--released-sizes", default="4096,16384", help="entry counts for the released V4 shape")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-transformers-above", type=int, default=65536,
                   help="skip the transformers formulation above this many entries (it holds [T, H, S] floats)")
    p.add_argument("--out", default="bench/results/index_topk")
    a = p.parse_args(argv)
    if not native_ready(a.threads):
        return 1
    shapes = [("long", T, 4, 32, 64, S) for S in map(int, a.sizes.split(",")) for T in (256, 1)]
    shapes += [("released V4", 64, 64, 128, 512, S) for S in map(int, a.released_sizes.split(",") if a.released_sizes else [])]
    rate, (peak, how) = gemm_rate(), fma_peak(a.threads)
    bw = stream_bandwidth(a.threads, total_mb=512)
    print(f"bound: fp32 FMA peak {peak:.0f} GFLOP/s ({how}); torch's fp32 GEMM (2048^3) on {a.threads} threads: "
          f"{rate:.0f} GFLOP/s; streaming bandwidth {bw:.1f} GB/s (decode's bound)")
    print(f"{'shape':<12} {'T':>4} {'S':>7} | {'native ms':>9} {'ns/pair':>7} {'GFLOP/s':>7} {'peak|bound':>11} | "
          f"{'PyTorch':>9} {'x':>5} | {'transformers':>12} {'x':>5} | same set")
    rows = []
    g = torch.Generator().manual_seed(0)
    for name, T, H, D, k, S in shapes:
        q, w, keys = torch.randn(1, T, H, D, generator=g), torch.randn(1, T, H, generator=g), torch.randn(1, S, D, generator=g)
        n_visible = torch.full((1, T), S)
        with torch.no_grad():
            nat = timed(torch.ops.dsv3.index_topk, q, w, keys, n_visible, k)
            ref = timed(pytorch_path, q, w, keys, n_visible, k)
            hf = timed(transformers_style, q, w, keys, n_visible, k) if S <= a.no_transformers_above else None
            i1, _ = torch.ops.dsv3.index_topk(q, w, keys, n_visible, k)
            i2, _ = pytorch_path(q, w, keys, n_visible, k)
        same = float((i1.sort(-1).values == i2.sort(-1).values).all(-1).float().mean())
        flops = 2 * T * S * H * D
        row = {"shape": name, "T": T, "S": S, "heads": H, "head_dim": D, "k": k, "native_s": nat, "reference_s": ref,
               "transformers_s": hf, "ns_per_pair": nat / (T * S) * 1e9, "gflops": flops / nat / 1e9,
               "share_of_peak": flops / nat / 1e9 / peak if peak else None, "vs_reference": ref / nat,
               "vs_transformers": hf / nat if hf else None, "same_set_share": same,
               "read_bound_s": S * D * 4 / (bw * 1e9) if T == 1 else None}
        rows.append(row)
        hf_s = f"{hf * 1e3:>10.1f}ms {hf / nat:>5.1f}" if hf else f"{'-':>12} {'-':>5}"
        fit = f"{row['share_of_peak'] or 0:>11.0%}" if T > 1 else f"{row['read_bound_s'] * 1e3:>9.2f}ms"
        print(f"{name:<12} {T:>4} {S:>7} | {nat * 1e3:>9.2f} {row['ns_per_pair']:>7.2f} {row['gflops']:>7.0f} {fit} | "
              f"{ref * 1e3:>7.1f}ms {ref / nat:>5.1f} | {hf_s} | {same:.0%}", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"threads": a.threads, "cpu": _cpu(), "fma_peak_gflops": peak, "fma_peak": how, "gemm_gflops": rate,
           "stream_gb_s": bw,
           "rows": rows}
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(rows, out / "index_topk.png")
    print(f"wrote {out / 'results.json'} and {out / 'index_topk.png'}")
    return 0 if all(r["same_set_share"] == 1.0 for r in rows) else 1


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, T in zip(axes, (256, 1)):
        rs = [r for r in rows if r["shape"] == "long" and r["T"] == T]
        for key, label in (("native_s", "dsv3::index_topk"), ("reference_s", "dsv3's PyTorch path"),
                           ("transformers_s", "transformers' formulation")):
            pts = [(r["S"], r[key] / (T * r["S"]) * 1e9) for r in rs if r[key]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("visible compressed entries S")
        ax.set_ylabel("ns per query-entry pair")
        ax.set_title(f"long model's indexer (4x32, top 64), {T} {'queries' if T > 1 else 'query'}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
