"""Engine benchmarks: dsv3 next to HF transformers and llama.cpp on the same model and prompts, in one run.

    python bench/engine_bench.py [--model DIR] [--tests batch1,throughput,ttft,spec] [--out bench/results]

Without --model it builds the random ~73M-parameter DeepSeek-V3-shaped model of
../shared/reference/bench-anchors.md with HF transformers. Everything runs in fp32 on the same
number of threads. Prints a table with ratios (dsv3 / anchor), writes results.json and a PNG chart.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from anchors import HFRunner, LlamaCppRunner  # noqa: E402
from models import make_bench_model  # noqa: E402
from roofline import decode_weight_bytes, stream_bandwidth  # noqa: E402

from dsv3.io.load import load_model# noqa: E402
from dsv3.engine import EngineConfig, LLMEngine  # noqa: E402
from dsv3.engine.sampling import SamplingParams  # noqa: E402
from dsv3.io.tokenizer import Tokenizer  # noqa: E402


def engine(model, tok, **kw) -> LLMEngine:
    return LLMEngine(model, tok, EngineConfig(max_model_len=2048, **kw))


def dsv3_generate(eng: LLMEngine, prompts: list[list[int]], out_lens: list[int]) -> float:
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in out_lens]
    t = time.perf_counter()
    eng.generate(prompts, params)
    return time.perf_counter() - t


def dsv3_ttft(eng: LLMEngine, prompt: list[int]) -> float:
    t = time.perf_counter()
    eng.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--tests", default="batch1,throughput,ttft,spec")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--anchors", default="hf,llama-f32,llama-f16", help="comma list of hf, llama-f32, llama-f16, llama-q8_0")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dsv3-bench")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or make_bench_model(args.cache / "bench73m")
    model = load_model(model_dir, dtype=torch.float32, progress=False)
    tok = Tokenizer.from_dir(model_dir)
    cfg = model.config
    anchors = []
    for a in filter(None, args.anchors.split(",")):
        try:
            anchors.append(HFRunner(model_dir) if a == "hf" else LlamaCppRunner(model_dir, a.split("-")[1], args.cache, args.threads))
        except Exception as e:  # an anchor that cannot run is reported, never silently dropped
            print(f"[anchor {a} skipped: {type(e).__name__}: {e}]", file=sys.stderr)
    rng = random.Random(0)
    vocab = min(cfg.vocab_size, tok.vocab_size)
    rand = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    rows: list[tuple[str, str, float, str]] = []
    tests = args.tests.split(",")

    if "batch1" in tests:
        prompt, n = [rand(32)], 128
        dsv3_generate(engine(model, tok), prompt, [8])  # warm-up
        rows.append(("batch-1 decode", "dsv3", n / dsv3_generate(engine(model, tok), prompt, [n]), "tok/s"))
        for a in anchors:
            a.generate(prompt, 8)
            rows.append(("batch-1 decode", a.name, n / a.generate(prompt, n), "tok/s"))
        mb, bw = decode_weight_bytes(model) / 1e6, stream_bandwidth(args.threads)
        rows.append(("batch-1 decode", f"bound: {mb:.0f} MB/token at {bw:.1f} GB/s", bw * 1e3 / mb, "tok/s"))

    if "throughput" in tests:
        N = args.requests
        prompts = [rand(rng.randint(16, 256)) for _ in range(N)]
        outs = [rng.randint(16, 128) for _ in range(N)]
        useful = sum(outs)
        rows.append((f"throughput, {N} requests", "dsv3", useful / dsv3_generate(engine(model, tok), prompts, outs), "tok/s"))
        for a in anchors:
            if isinstance(a, HFRunner):
                rows.append((f"throughput, {N} requests", a.name + " (batched)", useful / a.generate(prompts, max(outs)), "tok/s"))
            else:
                rows.append((f"throughput, {N} requests", a.name + " (sequential)", useful / a.generate(prompts, outs), "tok/s"))

    if "ttft" in tests:
        prefix = rand(1000)
        a_prompt, b_prompt = prefix + rand(16), prefix + rand(16)
        eng = engine(model, tok)
        cold = dsv3_ttft(eng, a_prompt)
        warm = dsv3_ttft(eng, b_prompt)
        rows.append(("TTFT, 1,016 tokens, cold", "dsv3", cold * 1000, "ms"))
        rows.append(("TTFT, shared 1,000-token prefix", "dsv3", warm * 1000, "ms"))
        rows.append(("TTFT speed-up from the prefix cache", "dsv3", cold / warm, "x"))
        for a in anchors:
            ca = a.ttft(a_prompt)
            wa = a.ttft(b_prompt)
            rows.append(("TTFT, shared 1,000-token prefix", a.name, wa * 1000, "ms"))
            rows.append(("TTFT speed-up from the prefix cache", a.name, ca / wa, "x"))
        mla = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 * cfg.num_hidden_layers
        mha = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 4 * cfg.num_hidden_layers
        rows.append(("cache bytes per token (fp32)", "dsv3 MLA latent", mla, "B"))
        rows.append(("cache bytes per token (fp32)", "MHA cache of the same model", mha, "B"))
        rows.append(("cache bytes per token (int8 latent)", "dsv3 --kv-cache-dtype int8", engine(model, tok, kv_cache_dtype="int8").runner.cache.bytes_per_token(), "B"))

    if "spec" in tests and len(model.model.mtp):
        prompts = [rand(32) for _ in range(4)]
        base_eng = engine(model, tok)
        base = dsv3_generate(base_eng, prompts[:1], [128])
        ref = [o.outputs[0].token_ids for o in base_eng.generate(prompts, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))]
        for k in (1, 2):
            eng = engine(model, tok, num_speculative_tokens=k)
            t = dsv3_generate(eng, prompts[:1], [128])
            same = [o.outputs[0].token_ids for o in eng.generate(prompts, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))] == ref
            acc = ", ".join(f"{r:.2f}" for r in eng.drafter.stats.acceptance_rate)
            rows.append((f"MTP speculative k={k} (acceptance {acc}; greedy identical: {same})", "dsv3", base / t, "x speed-up"))
    elif "spec" in tests:
        rows.append(("MTP speculative decoding", "skipped: the model has no MTP weights", 0.0, ""))

    report(rows, args.out)


def report(rows: list[tuple[str, str, float, str]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    print(f"{'test':<58}{'system':<34}{'value':>12}  unit   ratio dsv3/this")
    ours = {t: v for t, s, v, _ in rows if s == "dsv3"}
    for t, s, v, u in rows:
        ratio = f"{ours[t] / v:.2f}x" if t in ours and s != "dsv3" and v and u == "tok/s" else (
            f"{v / ours[t]:.2f}x" if t in ours and s != "dsv3" and u == "ms" and ours[t] else "")
        print(f"{t:<58}{s:<34}{v:>12.1f}  {u:<6} {ratio}")
    (out / "engine_bench.json").write_text(json.dumps([dict(test=t, system=s, value=v, unit=u) for t, s, v, u in rows], indent=1))
    tests = [t for t in dict.fromkeys(t for t, _, _, u in rows if u == "tok/s")]
    fig, axes = plt.subplots(1, max(1, len(tests)), figsize=(6 * max(1, len(tests)), 4))
    for ax, t in zip(axes if len(tests) > 1 else [axes], tests):
        sub = [(s, v) for tt, s, v, u in rows if tt == t]
        ax.barh([s for s, _ in sub], [v for _, v in sub], color=["tab:red" if s == "dsv3" else "tab:gray" for s, _ in sub])
        ax.set_title(t)
        ax.set_xlabel("tokens/s")
    fig.tight_layout()
    fig.savefig(out / "engine_bench.png", dpi=110)
    print(f"wrote {out / 'engine_bench.json'} and {out / 'engine_bench.png'}")


if __name__ == "__main__":
    main()
