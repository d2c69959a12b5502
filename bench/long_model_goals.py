"""Issue 25's goals, measured on the embedded long-context model beside the V3-architecture default model.

    python bench/long_model_goals.py [--only needle,long-ppl,speed,fim] [--quick] [--million]
                                     [--long-model long] [--default-model default] [--out bench/results/long_model]

Parts (one run, this machine, fp32, everything through dsv3's engine):
  needle    passkey retrieval (`dsv3 eval needle`, code format, python stdlib haystack) over lengths 1K-32K at
            five depths, then 64K and 128K; the default model beside it up to 8K, with YaRN
            stretched to each length (it trained on 512 tokens)
  long-ppl  bits/byte of held-out long code (`dsv3 data packages --split heldout`: whole packages no model
            trained on; the 4 longest of at most 150K characters) at sliding windows 512-16K, both models (the default one with YaRN
            stretched to each window)
  speed     each in a fresh process, one request: prefill of a real L-token prompt (seconds, peak RSS) then 32
            greedy decode steps (ms/token, median), L = 1K and 128K three times interleaved (medians), and 1M once
            with --million; cache bytes per token of both models
  fim       single-line infill exact match and edit similarity on held-out lines, both models, and the
            in-process 20-token infill latency
Prints each goal as met / NOT met with its figure, writes results.json and goals.png to --out.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from default_model import completion, speed  # noqa: E402

PARTS = ("needle", "long-ppl", "speed", "fim")
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
TRAINED_V3 = 512  # the default model's training length (its config.json's training_seq_len)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--long-model", default="long", help="long-context model: directory or embedded name (default: long)")
    p.add_argument("--default-model", default="default", help="V3-architecture model to compare (default: default)")
    p.add_argument("--heldout", default="build/packages-heldout",
                   help="held-out long documents (`dsv3 data packages --shards build/shards --split heldout -o DIR`)")
    p.add_argument("--shards", default="build/shards", help="shards whose held-out split gives the FIM lines")
    p.add_argument("--only", default=",".join(PARTS))
    p.add_argument("--quick", action="store_true", help="short lengths and few samples: a smoke test")
    p.add_argument("--million", action="store_true", help="also prefill and decode a 1M-token context (~13 min on 2 cores)")
    p.add_argument("--speed-repeats", type=int, default=3, help="runs of each of the 1K and 128K speed lengths (default 3)")
    p.add_argument("--ppl-files", type=int, default=4, help="long-ppl scores the N longest held-out documents ... (default 4)")
    p.add_argument("--ppl-max-chars", type=int, default=150_000, help="... of at most this many characters (default 150000)")
    p.add_argument("--trials", type=int, default=2, help="needle trials per (length, depth) cell up to 32K")
    p.add_argument("--fim", type=int, default=200, help="held-out lines for FIM")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/long_model")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--prefill-child", nargs=2, metavar=("MODEL", "LENGTH"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def backend(model: Path, max_len: int):
    from dsv3.eval.backends import InProcessBackend

    return InProcessBackend(model, dtype="float32", batch_size=4, max_length=max_len, max_model_len=max_len)


def run_needle(long_dir: Path, v3_dir: Path, a, out: Path) -> dict:
    from dsv3.eval import needle

    short = [1024, 2048, 4096] if a.quick else [1024, 2048, 4096, 8192, 16384, 32768]
    longer = [] if a.quick else [65536, 131072]
    trials = 1 if a.quick else a.trials
    res = {}
    b = backend(long_dir, max(short + longer) + 64)
    r = needle.evaluate(b, b.tok, short, DEPTHS, trials, plot=out / "needle_long.png")
    res["long"] = _task(r)
    if longer:
        r2 = needle.evaluate(b, b.tok, longer, DEPTHS, 1, seed=4321, plot=out / "needle_long_64k_128k.png")
        res["long_64k_128k"] = _task(r2)
    del b
    v3 = {"groups": {}, "config": {"yarn": "factor = length / 512 at each length over 512"}}
    for L in [L for L in short if L <= 8192]:  # YaRN matched to each length: the default model's best case
        bv = backend(_v3_at(v3_dir, L), L + 64)
        r3 = needle.evaluate(bv, bv.tok, [L], DEPTHS, trials)
        v3["groups"].update({k: {"acc": m["acc"].value} for k, m in r3.groups.items() if not k.startswith("depth/")})
        del bv
    res["default_yarn"] = v3
    return res


def run_long_ppl(long_dir: Path, v3_dir: Path, a, out: Path) -> dict:
    from dsv3.eval import long_ppl

    files = sorted(Path(a.heldout).glob("*.py"), key=lambda f: -f.stat().st_size)
    files = [f for f in files if f.stat().st_size <= a.ppl_max_chars][:a.ppl_files]  # long, in a bounded time
    if not files:
        raise SystemExit(f"error: no held-out documents in {a.heldout} (build them: dsv3 data packages --shards "
                         f"build/shards --split heldout -o {a.heldout})")
    contexts = [512, 1024, 2048] if a.quick else [512, 1024, 2048, 4096, 8192, 16384]
    files = files[-2:] if a.quick else files
    res = {"files": len(files), "chars": sum(f.stat().st_size for f in files)}
    b = backend(long_dir, max(contexts) + 64)
    res["long"] = _task(long_ppl.evaluate(b, files, contexts, plot=out / "long_ppl_long.png"))
    del b
    v3 = {"groups": {}, "config": {"yarn": "factor = context / 512 at each context over 512"}}
    for c in contexts:
        b = backend(_v3_at(v3_dir, c), c + 64)
        v3["groups"].update(_task(long_ppl.evaluate(b, files, [c]))["groups"])
        del b
    res["default_yarn"] = v3
    return res


def _v3_at(model: Path, length: int) -> Path:
    """The default model (trained on 512-token sequences) with YaRN stretched to `length`, as docs/generate.md
    extends it; unchanged up to 512."""
    from dsv3.models.context_length import with_rope_scaling

    if length <= TRAINED_V3:
        return model
    return with_rope_scaling(model, {"type": "yarn", "factor": length / TRAINED_V3,
                                     "original_max_position_embeddings": TRAINED_V3})


def _task(result) -> dict:
    return {"metrics": {k: {"value": m.value, "stderr": m.stderr, "n": m.n} for k, m in result.metrics.items()},
            "groups": {g: {k: m.value for k, m in ms.items()} for g, ms in result.groups.items()
                       if not g.startswith("file/")},
            "seconds": getattr(result, "seconds", None), "config": result.config}


@torch.inference_mode()
def prefill_child(model_dir: str, length: int) -> dict:
    """In a fresh process: one request of `length` tokens of real code and 32 more generated. The prefill lasts
    until the step that yields the first token; decode is the median of the 32 steps after it. Peak RSS is the
    process's (model, cache, prompt), taken after the run."""
    from dsv3 import LLM, SamplingParams
    from dsv3.eval.needle import default_haystack

    budget = sum(s.bytes_per_sequence(torch.float32, length + 40) for s in _specs(model_dir))
    llm = LLM(model_dir, dtype="float32", max_model_len=length + 40, max_num_seqs=1, enable_prefix_caching=False,
              kv_cache_memory=int(budget * 1.25) + (64 << 20))
    tok = llm.tokenizer
    text = default_haystack()[: 8 * length]  # ~3.3 characters per token: enough, without tokenizing all of it
    ids = tok.encode(text, add_special_tokens=False)
    while len(ids) < length:  # 1M tokens is more than the stdlib: repeat it
        ids = ids + ids
    prompt = [tok.bos_token_id] + ids[: length - 1]
    eng, decode_steps = llm.engine, 32
    eng.add_request("d", prompt, SamplingParams(max_tokens=decode_steps + 1, temperature=0, ignore_eos=True))
    start, stamps = time.perf_counter(), []
    while eng.has_unfinished_requests():
        eng.step()
        stamps.append(time.perf_counter())
    first = stamps[-(decode_steps + 1)]  # each step after the prefill's last chunk yields one token
    steps = sorted(b - a for a, b in zip(stamps[-(decode_steps + 1):], stamps[-decode_steps:]))
    cache = round(sum(s.bytes_per_sequence(torch.float32, length) for s in llm.model.cache_specs()) / length)
    return {"length": length, "prefill_s": first - start, "prefill_tok_s": length / (first - start),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "decode_ms": 1000 * steps[len(steps) // 2], "cache_bytes_per_token": cache}


def _specs(model_dir: str | Path) -> list:
    from dsv3.io.load import load_model

    return load_model(model_dir, dtype="fp32", progress=False).cache_specs()


def run_speed(long_dir: Path, v3_dir: Path, a) -> dict:
    """Each length in its own process, the 1K and 128K pair `--speed-repeats` times interleaved (1K, 128K, 1K, ...):
    this VM's speed drifts by up to 2x between minutes, and a ratio of two single runs minutes apart measured the
    drift. Each figure is the median over the repeats (peak RSS the largest); every run is kept under "runs"."""
    lengths = [1024, 8192] if a.quick else [1024, 131072]
    runs: dict = {str(L): [] for L in lengths}
    for _ in range(1 if a.quick else a.speed_repeats):
        for L in lengths:
            runs[str(L)].append(_prefill_run(long_dir, L, a))
    if a.million:
        runs[str(1 << 20)] = [_prefill_run(_million(long_dir), 1 << 20, a)]
    res = {"long": {L: _median_run(rs) for L, rs in runs.items()}, "runs": runs}
    per = {}
    for name, d in (("long", long_dir), ("default", v3_dir)):
        per[name] = round(sum(s.bytes_per_sequence(torch.float32, 131072) for s in _specs(d)) / 131072)
    res["cache_bytes_per_token_at_128k"] = per
    return res


def _prefill_run(model: Path, L: int, a) -> dict:
    cmd = [sys.executable, __file__, "--prefill-child", str(model), str(L), "--threads", str(a.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    r = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  long model, {L:>8} tokens: {r}", flush=True)
    return r


def _median_run(rs: list[dict]) -> dict:
    """The median of each timing over the runs that finished, the largest peak RSS; an error if none finished."""
    ok = [r for r in rs if "error" not in r]
    if not ok:
        return rs[0]
    med = lambda k: sorted(r[k] for r in ok)[len(ok) // 2]  # noqa: E731
    out = {**ok[0], "prefill_s": med("prefill_s"), "decode_ms": med("decode_ms"),
           "peak_rss_gb": max(r["peak_rss_gb"] for r in ok), "repeats": len(ok)}
    out["prefill_tok_s"] = out["length"] / out["prefill_s"]
    return out


def _million(model: Path) -> Path:
    from dsv3.models.context_length import with_max_position

    return with_max_position(model, (1 << 20) + 64)


def run_fim(long_dir: Path, v3_dir: Path, a) -> dict:
    from default_model_eval import FIM_SAMPLES, FIM_TEMPERATURE, fim_prompts, run_fim as score_fim

    from dsv3.data.instructions import split_files
    from dsv3.llm import LLM

    files = split_files(a.shards, "heldout", None)
    n = 6 if a.quick else a.fim
    ns = argparse.Namespace(seed=0, fim_prefix_tokens=384, fim_suffix_tokens=128, fim_samples=0 if a.quick else FIM_SAMPLES,
                            fim_temperature=FIM_TEMPERATURE)
    res = {}
    for name, d in (("long", long_dir), ("default", v3_dir)):
        llm = LLM(d, dtype="float32", max_model_len=1024, max_num_seqs=64)
        prompts = fim_prompts(llm.tokenizer, files, ns, n + 11)
        res[name] = score_fim(llm, llm.tokenizer, prompts[:n], ns, not a.no_progress)
        lat = [completion.fim_prompt_ids(llm.tokenizer, p, s) for _, p, s in prompts[:11]]
        res[name]["infill_latency"] = speed.infill_in_process(llm, lat, progress=False)
        del llm
    return res


def goals(r: dict) -> list[tuple[str, str, bool]]:
    """(goal, measured, met) for every goal the run has figures for."""
    rows = []
    if "needle" in r:
        g = r["needle"]["long"]["groups"]
        cells = {k: v["acc"] for k, v in g.items() if k.startswith("cell/")}
        worst = min(cells.items(), key=lambda kv: kv[1])
        rows.append(("needle >= 90 % at every depth up to 32K", f"worst cell {worst[0][5:]} = {worst[1]:.0%}; "
                     f"overall {r['needle']['long']['metrics']['acc']['value']:.0%}", worst[1] >= 0.9))
        if "long_64k_128k" in r["needle"]:
            lg = r["needle"]["long_64k_128k"]["groups"]
            rows.append(("needle reported to 128K", ", ".join(f"{k[7:]}: {v['acc']:.0%}" for k, v in lg.items()
                                                             if k.startswith("length/")), True))
    if "long-ppl" in r:
        m = r["long-ppl"]["long"]["groups"]
        c = sorted(int(k.split("/")[1]) for k in m)
        at = lambda n: m[f"context/{n}"]["bits_per_byte"]  # noqa: E731
        lo, hi = 1024, (16384 if 16384 in c else c[-1])
        rows.append((f"long-ppl bits/byte at {hi // 1024}K <= 0.9x at 1K", f"{at(hi):.3f} / {at(lo):.3f} = "
                     f"{at(hi) / at(lo):.3f}x", at(hi) / at(lo) <= 0.9))
    if "speed" in r:
        s = r["speed"]["long"]
        if "1024" in s and "131072" in s and "decode_ms" in s["131072"]:
            ratio = s["1024"]["decode_ms"] / s["131072"]["decode_ms"]
            rows.append(("decode at 128K >= 0.6x its speed at 1K", f"{ratio:.2f}x ({s['131072']['decode_ms']:.1f} vs "
                         f"{s['1024']['decode_ms']:.1f} ms/token)", ratio >= 0.6))
            rows.append(("128K prefill reported", f"{s['131072']['prefill_s']:.0f} s, peak RSS "
                         f"{s['131072']['peak_rss_gb']:.2f} GB", True))
        c = r["speed"]["cache_bytes_per_token_at_128k"]
        rows.append(("cache/token <= 0.3x the V3 default model's", f"{c['long']} / {c['default']} B = "
                     f"{c['long'] / c['default']:.3f}x", c["long"] / c["default"] <= 0.3))
        if str(1 << 20) in s:
            m1 = s[str(1 << 20)]
            rows.append(("1M-token context reported", m1.get("error") or f"prefill {m1['prefill_s']:.0f} s, peak "
                         f"{m1['peak_rss_gb']:.2f} GB, decode {m1['decode_ms']:.1f} ms/token", "error" not in m1))
    if "fim" in r:
        for name, f in r["fim"].items():
            rows.append((f"FIM line exact match >= 15 % ({name})", f"{f['exact_match']:.1%} (edit similarity "
                         f"{f['edit_similarity']:.1%}, n={f['n']}"
                         + (f"; pass@{f['samples']} {f['pass_at_k_exact_match']:.1%}, prefix alone "
                            f"{f['prefix_only_pass_at_k_exact_match']:.1%}" if "samples" in f else "") + ")",
                         f["exact_match"] >= 0.15))
            p50 = 1000 * f["infill_latency"]["latency_s"]["p50"]
            rows.append((f"infill p50 < 300 ms ({name}, 20 tokens)", f"{p50:.0f} ms", p50 < 300))
    return rows


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if "long-ppl" in r:
        for name, res in r["long-ppl"].items():
            if isinstance(res, dict) and "groups" in res:
                cs = sorted(int(k.split("/")[1]) for k in res["groups"])
                axes[0].plot(cs, [res["groups"][f"context/{c}"]["bits_per_byte"] for c in cs], marker="o", label=name)
        axes[0].set_xscale("log", base=2)
        axes[0].set_xlabel("sliding window (tokens)")
        axes[0].set_ylabel("bits per byte, held-out packages")
        axes[0].legend()
        axes[0].grid(alpha=0.3)
    if "needle" in r:
        for name, res in r["needle"].items():
            ls = sorted(int(k.split("/")[1]) for k in res["groups"] if k.startswith("length/"))
            axes[1].plot(ls, [res["groups"][f"length/{L}"]["acc"] for L in ls], marker="o", label=name)
        axes[1].set_xscale("log", base=2)
        axes[1].set_ylim(-0.05, 1.05)
        axes[1].set_xlabel("context (tokens)")
        axes[1].set_ylabel("needle accuracy (all depths)")
        axes[1].legend()
        axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.prefill_child:
        print(json.dumps(prefill_child(a.prefill_child[0], int(a.prefill_child[1]))))
        return 0
    from dsv3.io.paths import model_path

    parts = [p for p in a.only.split(",") if p]
    if set(parts) - set(PARTS):
        print(f"error: unknown part {sorted(set(parts) - set(PARTS))[0]!r} (parts: {', '.join(PARTS)})", file=sys.stderr)
        return 2
    long_dir, v3_dir = model_path(a.long_model), model_path(a.default_model)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    r: dict = {"long_model": str(long_dir), "default_model": str(v3_dir), "threads": a.threads, "quick": a.quick,
               "cpu": _cpu()}
    for part in parts:
        t = time.perf_counter()
        print(f"== {part}", flush=True)
        if part == "needle":
            r[part] = run_needle(long_dir, v3_dir, a, out)
        elif part == "long-ppl":
            r[part] = run_long_ppl(long_dir, v3_dir, a, out)
        elif part == "speed":
            r[part] = run_speed(long_dir, v3_dir, a)
        else:
            r[part] = run_fim(long_dir, v3_dir, a)
        r.setdefault("seconds", {})[part] = time.perf_counter() - t
    r["goals"] = [{"goal": g, "measured": m, "met": ok} for g, m, ok in goals(r)]
    r["elapsed_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(r, indent=1) + "\n")
    plot(r, out / "goals.png")
    for g in r["goals"]:
        print(f"{'met    ' if g['met'] else 'NOT met'}  {g['goal']}: {g['measured']}")
    print(f"wrote {out / 'results.json'} and {out / 'goals.png'} ({r['elapsed_s']:.0f} s, {a.threads} threads, {r['cpu']})")
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
