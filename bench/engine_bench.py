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
    ap.add_argument("--tests", default="batch1,throughput,decode,ttft,spec")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--anchors", default="hf,llama-f32,llama-f16", help="comma list of hf, llama-f32, llama-f16, llama-q8_0")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dsv3-bench")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--mtp-model", type=Path, default=None, help="model with MTP weights for the spec test "
                    "(default: the embedded default model)")
    ap.add_argument("--mtp-threads", default="2,1", help="thread counts the spec test runs at")
    ap.add_argument("--mtp-prompts", type=int, default=8)
    ap.add_argument("--mtp-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3, help="spec test: alternating runs per system, the best kept")
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

    if "decode" in tests:
        rows += decode_rows(model, tok, args.requests, args.threads, rng)

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

    if "spec" in tests:
        rows += mtp_rows(args)

    report(rows, args.out)


def gemm_rate(model, rows: int, threads: int, rounds: int = 20) -> tuple[float, str]:
    """The best fp32 GEMM rate (FLOP/s) PyTorch reaches on this machine at `rows` rows over the model's own linear
    shapes (attention, MLP, expert and head matrices), and the shape it was reached at."""
    import torch.nn.functional as F

    shapes = {tuple(p.shape[-2:]) for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n}
    torch.set_num_threads(threads)
    best, where = 0.0, ""
    for N, K in sorted(shapes):
        x, w = torch.randn(rows, K), torch.randn(N, K)
        for _ in range(3):
            F.linear(x, w)
        t = time.perf_counter()
        for _ in range(rounds):
            F.linear(x, w)
        rate = 2 * rows * N * K * rounds / (time.perf_counter() - t)
        if rate > best:
            best, where = rate, f"[{rows}, {K}] x [{K}, {N}]"
    return best, where


def decode_rows(model, tok, n: int, threads: int, rng: random.Random) -> list[tuple[str, str, float, str]]:
    """Decode throughput of `n` concurrent greedy requests (prompts 16-256 tokens, 128 new tokens each), timed from
    the step after every request has its first token to the end, next to the compute bound: the machine's fp32
    GEMM rate (the higher of two measurements, before and after) over 2 x the active parameters a token multiplies
    (the LM head included, the embedding lookup not).
    dsv3 runs as it does by default (greedy steps pick tokens through the bf16-screened fp32 head) and with fp32
    logits of every row, alternating, best of two each; the two outputs must be identical."""
    from roofline import decode_weight_bytes, stream_bandwidth

    prompts = [[rng.randrange(3, min(model.config.vocab_size, tok.vocab_size)) for _ in range(rng.randint(16, 256))]
               for _ in range(n)]
    params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    before_rate = gemm_rate(model, n, threads)  # the machine's rate drifts: the bound takes the higher of two
    best, outs = {True: 0.0, False: 0.0}, {}
    for _ in range(2):
        for screened in (True, False):  # the bf16-screened greedy head (the default), and fp32 logits of every row
            eng = engine(model, tok, screened_head=screened)
            for i, p in enumerate(prompts):
                eng.add_request(str(i), p, params)
            while any(not r.seqs[0].output.token_ids for r in eng.requests.values()):
                eng.step()
            before, t = eng.stats["generation_tokens"], time.perf_counter()
            done = {}
            while eng.has_unfinished_requests():
                done.update((o.request_id, o.outputs[0].token_ids) for o in eng.step() if o.finished)
            best[screened] = max(best[screened], (eng.stats["generation_tokens"] - before) / (time.perf_counter() - t))
            outs[screened] = done
    flops = 2 * decode_weight_bytes(model) / model.model.embed_tokens.weight.element_size()
    rate, where = max(before_rate, gemm_rate(model, n, threads))  # measured before and after the decode runs
    bound = rate / flops
    # What the compute bound leaves out: at this batch every expert's weights are read each step (not just a token's
    # active ones), and each sequence's cached latents (mean context over the decode) per layer.
    mtp = sum(p.numel() for p in model.model.mtp.parameters())
    weights = (sum(p.numel() for n_, p in model.named_parameters() if "embed_tokens" not in n_) - mtp) * 4
    context = sum(len(p) for p in prompts) / n + params.max_tokens / 2
    cache = n * context * model.config.num_hidden_layers * (model.config.kv_lora_rank + model.config.qk_rope_head_dim) * 4
    bw = stream_bandwidth(threads)
    test = f"decode throughput, {n} requests"
    same = "identical to" if outs[True] == outs[False] else "DIFFERS from"
    return [(test, "dsv3", best[True], "tok/s"),
            (test, f"dsv3, fp32 head (screened_head=False, output {same} dsv3's)", best[False], "tok/s"),
            (test, f"bound: {flops / 2e6:.1f}M active params at {rate / 1e9:.0f} GFLOP/s ({where})", bound, "tok/s"),
            (test + ": dsv3 / compute bound", "dsv3", best[True] / bound, "x"),
            (test + ": dsv3 with fp32 logits / compute bound", "dsv3", best[False] / bound, "x"),
            (test, f"memory bound: {(weights + cache) / 1e6:.0f} MB/step (all weights, {cache / 1e6:.0f} MB of cache) "
                   f"at {bw:.1f} GB/s", bw * 1e9 * n / (weights + cache), "tok/s")]


def mtp_rows(args) -> list[tuple[str, str, float, str]]:
    """Batch-1 greedy decoding with MTP drafts (k = 1, 2) against plain decoding and llama.cpp F32 on the same model,
    prompts and token ids, at each thread count: best of `rounds` alternating runs; MTP's output must equal plain."""
    from dsv3.io.paths import default_model_dir

    model_dir = args.mtp_model or default_model_dir()
    model = load_model(model_dir, dtype=torch.float32, progress=False)
    if not len(model.model.mtp):
        return [("MTP speculative decoding", "skipped: the model has no MTP weights", 0.0, "")]
    tok = Tokenizer.from_dir(model_dir)
    starts = ["def ", "class ", "import os\n", "    return ", "for i in range(", "if __name__", "# ", "with open("]
    prompts = [tok.encode(starts[i % len(starts)], add_special_tokens=True) for i in range(args.mtp_prompts)]
    n = args.mtp_tokens
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    rows = []
    for threads in (int(t) for t in args.mtp_threads.split(",")):
        torch.set_num_threads(threads)
        systems = {"plain": engine(model, tok), "MTP k=1": engine(model, tok, num_speculative_tokens=1),
                   "MTP k=2": engine(model, tok, num_speculative_tokens=2)}
        try:
            systems["llama.cpp F32"] = LlamaCppRunner(model_dir, "f32", args.cache, threads)
        except Exception as e:  # reported, never silently dropped
            print(f"[anchor llama.cpp F32 skipped: {type(e).__name__}: {e}]", file=sys.stderr)
        outs, best = {}, {}
        for _ in range(args.rounds):
            for name, system in systems.items():
                if isinstance(system, LlamaCppRunner):
                    secs = system.generate(prompts, n)
                else:
                    t = time.perf_counter()
                    outs[name] = [[o.outputs[0].token_ids for o in system.generate([p], params)][0] for p in prompts]
                    secs = time.perf_counter() - t
                best[name] = max(best.get(name, 0.0), len(prompts) * n / secs)
        test = f"batch-1 greedy decode, {model_dir.name} model, {threads} thread(s)"
        for name, value in best.items():
            note = ""
            if name.startswith("MTP"):
                st = systems[name].drafter.stats
                note = (f" (acceptance {', '.join(f'{r:.1%}' for r in st.acceptance_rate)}; "
                        f"output {'identical to' if outs[name] == outs['plain'] else 'DIFFERS from'} plain)")
            rows.append((test, ("dsv3 " if name != "llama.cpp F32" else "") + name + note, value, "tok/s"))
        for name in ("MTP k=1", "MTP k=2"):
            rows.append((test + f": {name} / plain", "dsv3", best[name] / best["plain"], "x"))
            if "llama.cpp F32" in best:
                rows.append((test + f": {name} / llama.cpp F32", "dsv3", best[name] / best["llama.cpp F32"], "x"))
    return rows


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
        print(f"{t:<58}{s:<34}{v:>12.{2 if u == 'x' else 1}f}  {u:<6} {ratio}")
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
