"""The GPU benchmark: dsv3 next to HF transformers on one GPU, the HBM roofline, and the kernels, in one run.

    python bench/gpu_bench.py [--out bench/results] [--skip-hf] [--skip-kernels]

Builds a random ~1.7B-parameter DeepSeek-V3-shaped model (8 layers, 32 routed experts of which 6 per token,
MLA with a 512 latent) with HF transformers on the GPU, saves it, loads it into dsv3 (bf16) and into HF
transformers (bf16, same GPU), and measures, side by side:

* batch-1 decode tok/s, and the HBM roofline for it: bytes read per token (active weights + latent
  cache) ÷ the GPU's bandwidth measured in this run (a device-to-device copy) -- goal: dsv3 ≥ 70 %;
* throughput of 64 requests (128 prompt + 128 generated tokens each) -- goal: dsv3 ≥ 5× HF;
* time to first token with a shared 1,024-token prefix (dsv3's prefix cache vs HF's full prefill);
* the kernels: Triton MLA decode (dense and DSA top-k), fused MoE, FP8 block GEMM and router against their
  PyTorch references (max relative error, goal ≤ 1e-2 in bf16) and against FlashMLA / DeepGEMM / sgl-kernel
  when installed, with times.

Prints a table with ratios, writes gpu_bench.json and gpu_bench.png to --out. Designed to finish in under
8 minutes on an H100 (about 4 expected); a machine without CUDA gets one line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

MODEL = dict(  # ~1.72B parameters, ~0.56B active per token
    vocab_size=32000, hidden_size=2560, intermediate_size=6912, moe_intermediate_size=768, num_hidden_layers=8,
    num_attention_heads=20, num_key_value_heads=20, n_shared_experts=1, n_routed_experts=32, num_experts_per_tok=6,
    n_group=8, topk_group=4, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1024, qk_rope_head_dim=64,
    qk_nope_head_dim=128, v_head_dim=128, first_k_dense_replace=1, max_position_embeddings=4096,
    bos_token_id=0, eos_token_id=1, num_nextn_predict_layers=0,
)
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def fail(msg: str) -> "None":
    print(f"gpu_bench: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def sync() -> None:
    torch.cuda.synchronize()


# ---- the machine ---------------------------------------------------------------------------------------------
def hbm_bandwidth(gib: float = 2.0, rounds: int = 10) -> float:
    """GB/s of a device-to-device copy of `gib` GiB (each byte read once and written once), best of `rounds`."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(rounds + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        sync()
        best = max(best, 2 * src.numel() * 2 / (start.elapsed_time(end) / 1e3) / 1e9)
    del src, dst
    torch.cuda.empty_cache()
    return best


def decode_bytes(model, context: int) -> int:
    """Bytes one batch-1 decode step reads: the active weights (all but unused experts, MTP and the embedding table)
    plus every layer's latent cache up to `context` tokens."""
    from roofline import decode_weight_bytes

    cfg = model.config
    cache = cfg.num_hidden_layers * context * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * model.dtype.itemsize
    return decode_weight_bytes(model) + cache


# ---- the model -----------------------------------------------------------------------------------------------
def build_model(path: Path) -> Path:
    """The random model, initialised on the GPU by HF transformers and saved as a checkpoint both sides load."""
    import transformers

    from models import _write_tokenizer

    cfg = transformers.DeepseekV3Config(**MODEL)
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = transformers.DeepseekV3ForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():  # HF leaves the router bias at zero; give selection something to correct
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.02)
    hf.save_pretrained(path)
    del hf
    torch.cuda.empty_cache()
    _write_tokenizer(path, cfg.vocab_size)
    return path


# ---- dsv3 ----------------------------------------------------------------------------------------------------
def dsv3_engine(model, tok, **kw):
    from dsv3.engine import EngineConfig, LLMEngine

    return LLMEngine(model, tok, EngineConfig(max_model_len=2048, max_num_seqs=64, kv_cache_memory=4 << 30, **kw))


def dsv3_decode_rate(eng, prompt: list[int], n: int) -> float:
    """Decode tok/s of one request, from its first token to its last."""
    from dsv3.engine.sampling import SamplingParams

    eng.add_request(f"b1-{time.perf_counter_ns()}", prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    first = None
    while eng.has_unfinished_requests():
        outs = eng.step()
        if first is None and outs and outs[0].outputs[0].token_ids:
            first = time.perf_counter()
    return (n - 1) / (time.perf_counter() - first)


def dsv3_generate(eng, prompts: list[list[int]], n: int) -> float:
    from dsv3.engine.sampling import SamplingParams

    t = time.perf_counter()
    eng.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    return time.perf_counter() - t


# ---- HF transformers -----------------------------------------------------------------------------------------
class HF:
    def __init__(self, path: Path):
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda").eval()

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], n: int) -> float:
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        sync()
        t = time.perf_counter()
        self.model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)
        sync()
        return time.perf_counter() - t

    def decode_rate(self, prompt: list[int], n: int) -> float:
        return (n - 1) / (self.generate([prompt], n) - self.generate([prompt], 1))


# ---- kernels ---------------------------------------------------------------------------------------------------
def bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


@torch.no_grad()
def kernel_rows() -> list[dict]:
    """Each kernel against its reference (error) and the maintained package when installed (error, time)."""
    from dsv3.layers.moe import Experts
    from dsv3.ops import reference
    from dsv3.ops.triton import fp8, mla, moe, router, vendor
    from dsv3.quant.schemes import quantize_fp8_block

    rows = []
    bf = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, dtype=bf, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype)

    # absorbed MLA decode, dense over a paged cache (64-slot blocks, FlashMLA's layout)
    B, H, C, dr, ctx, bs = 64, 128, 512, 64, 2048, 64
    blocks = B * ctx // bs
    cache = rnd(blocks * bs, C + dr)
    table = torch.randperm(blocks, device="cuda").view(B, ctx // bs).int()
    lens = torch.randint(ctx // 2, ctx + 1, (B,), device="cuda", generator=g).int()
    q = rnd(B, H, C + dr)
    slots = mla.slots_from_block_table(table, bs, ctx)
    want = reference.mla_attend(q, cache, slots, lens, C, 0.07)
    ours = lambda: mla.mla_decode(q, cache, slots, lens, C, 0.07)  # noqa: E731
    read = int(lens.sum()) * (C + dr) * 2
    row = {"kernel": f"MLA decode dense, B={B} H={H} ctx≤{ctx}", "rel_err": rel(ours(), want), "triton_ms": bench_ms(ours),
           "torch_ms": bench_ms(lambda: reference.mla_attend(q, cache, slots, lens, C, 0.07)), "bytes": read}
    if vendor.module("flash_mla") is not None:
        try:
            theirs = lambda: vendor.flash_mla(q, cache, table, lens, C, 0.07)  # noqa: E731
            row.update(vendor="FlashMLA", vendor_rel_err=rel(theirs(), want), vendor_ms=bench_ms(theirs))
        except Exception as e:  # noqa: BLE001
            row.update(vendor="FlashMLA", vendor_error=f"{type(e).__name__}: {e}"[:200])
    rows.append(row)

    # DSA: top-k slots per row (-1 padded)
    k = 2048
    big = rnd(B * 8192, C + dr)
    idx = torch.randint(0, big.shape[0], (B, k), device="cuda", generator=g).int()
    idx[:, k - 100:] = -1
    want = reference.mla_attend(q, big, idx, None, C, 0.07)
    ours = lambda: mla.mla_decode_sparse(q, big, idx, C, 0.07)  # noqa: E731
    rows.append({"kernel": f"MLA decode sparse (DSA), B={B} H={H} top-{k}", "rel_err": rel(ours(), want),
                 "triton_ms": bench_ms(ours), "torch_ms": bench_ms(lambda: reference.mla_attend(q, big, idx, None, C, 0.07)),
                 "bytes": B * (k - 100) * (C + dr) * 2})
    del cache, big
    torch.cuda.empty_cache()

    # fused MoE vs the layer's PyTorch path (grouped_mm)
    D, I, E, K = 2560, 768, 32, 6
    experts = Experts(E, D, I).cuda().to(bf)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.02, generator=g)
        experts.down_proj.normal_(0, 0.02, generator=g)
    for N in (1, 64, 4096):
        x = rnd(N, D)
        ids = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(N)])
        w = torch.rand(N, K, device="cuda", generator=g)
        want = reference.fused_moe(x, experts.gate_up_proj, experts.down_proj, ids, w)
        ours = lambda: moe.fused_moe(x, experts.gate_up_proj, experts.down_proj, ids, w)  # noqa: E731
        active = len(torch.unique(ids)) * 3 * D * I * 2
        rows.append({"kernel": f"fused MoE, N={N} D={D} I={I} E={E} top-{K}", "rel_err": rel(ours(), want),
                     "triton_ms": bench_ms(ours), "torch_ms": bench_ms(lambda: _torch_experts(experts, x, ids, w)),
                     "bytes": active})

    # FP8 block GEMM (W8A8, 128×128 weight blocks)
    Nw, Kw = 7168, 2048
    wq, ws = quantize_fp8_block(torch.randn(Nw, Kw, device="cuda", generator=g) * 0.02)
    wd = (wq.float() * ws.repeat_interleave(128, 0)[:Nw].repeat_interleave(128, 1)[:, :Kw]).to(bf)
    for M in (1, 64, 4096):
        x = rnd(M, Kw)
        want = reference.fp8_gemm(x, wq, ws)
        ours = lambda: fp8.fp8_gemm(x, wq, ws)  # noqa: E731
        row = {"kernel": f"FP8 block GEMM, M={M} N={Nw} K={Kw}", "rel_err": rel(ours(), want), "triton_ms": bench_ms(ours),
               "torch_ms": bench_ms(lambda: x @ wd.T), "torch_is": "bf16 matmul of the dequantized weight",
               "bytes": Nw * Kw + M * Kw * 2}
        if vendor.module("deep_gemm") is not None:
            try:
                theirs = lambda: vendor.deep_gemm_fp8(x, wq, ws)  # noqa: E731
                row.update(vendor="DeepGEMM", vendor_rel_err=rel(theirs(), want), vendor_ms=bench_ms(theirs))
            except Exception as e:  # noqa: BLE001
                row.update(vendor="DeepGEMM", vendor_error=f"{type(e).__name__}: {e}"[:200])
        rows.append(row)

    # the V3 router at V3's own shape
    x, wr, b = rnd(64, 7168, dtype=torch.float32), rnd(256, 7168, dtype=torch.float32, scale=0.02), rnd(256, dtype=torch.float32, scale=0.02)
    want = reference.route_noaux(x, wr, b, 8, 4, 8, True, 2.5)
    got = router.route_noaux(x, wr, b, 8, 4, 8, True, 2.5)
    rows.append({"kernel": "V3 router, 64 tokens, 256 experts in 8 groups, top-8",
                 "rel_err": rel(got[0], want[0]), "same_experts": bool(torch.equal(got[1], want[1])),
                 "triton_ms": bench_ms(lambda: router.route_noaux(x, wr, b, 8, 4, 8, True, 2.5)),
                 "torch_ms": bench_ms(lambda: reference.route_noaux(x, wr, b, 8, 4, 8, True, 2.5)), "bytes": 256 * 7168 * 4})
    return rows


def _torch_experts(experts, x, ids, w):
    """The MoE layer's PyTorch path (sort, grouped_mm, combine), with the Triton hook bypassed."""
    from dsv3 import ops

    saved = ops.experts_gpu
    ops.experts_gpu = lambda *a, **k: None
    try:
        from dsv3.layers.moe import run_experts

        return run_experts(experts, x, ids, w)
    finally:
        ops.experts_gpu = saved


# ---- report --------------------------------------------------------------------------------------------------
def report(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps(res, indent=2))
    e = res["engine"]
    panels = [("batch-1 decode (tok/s)", "batch1_tok_s"), ("64-request throughput (tok/s)", "throughput_tok_s"),
              ("TTFT, shared 1,024-token prefix (ms)", "ttft_ms")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (title, key) in zip(axes, panels):
        names = [n for n in ("dsv3", "transformers") if e.get(n, {}).get(key) is not None]
        ax.bar(names, [e[n][key] for n in names], color=["#1f77b4", "#ff7f0e"][: len(names)])
        if key == "batch1_tok_s":
            ax.axhline(res["roofline"]["tok_s"], color="k", ls="--", label="HBM roofline")
            ax.axhline(0.7 * res["roofline"]["tok_s"], color="grey", ls=":", label="70 % goal")
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"dsv3 vs HF transformers on {res['gpu']} ({res['model']['params'] / 1e9:.2f}B-parameter random V3-shaped model, bf16)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "gpu_bench.png", dpi=120)


def table(res: dict) -> str:
    e, r = res["engine"], res["roofline"]
    d, h = e["dsv3"], e.get("transformers", {})
    lines = [f"GPU: {res['gpu']} · HBM {r['bandwidth_gb_s']:.0f} GB/s measured · model {res['model']['params'] / 1e9:.2f}B "
             f"parameters ({res['model']['active'] / 1e9:.2f}B active), bf16",
             f"{'metric':42} {'dsv3':>12} {'transformers':>14} {'ratio':>8}"]

    def row(name, key, unit, better_high=True):
        a, b = d.get(key), h.get(key)
        ratio = (a / b if better_high else b / a) if a and b else float("nan")
        lines.append(f"{name:42} {a:>10.1f} {unit:<3}" + (f" {b:>12.1f} {unit:<3} {ratio:>6.2f}x" if b else ""))

    row("batch-1 decode", "batch1_tok_s", "t/s")
    row("64-request throughput", "throughput_tok_s", "t/s")
    row("TTFT, shared 1,024-token prefix", "ttft_ms", "ms", better_high=False)
    lines.append(f"{'HBM roofline, batch-1 decode':42} {r['tok_s']:>10.1f} t/s   ({r['bytes_per_token'] / 1e6:.0f} MB/token "
                 f"÷ {r['bandwidth_gb_s']:.0f} GB/s)")
    frac = d["batch1_tok_s"] / r["tok_s"]
    lines.append(f"goal: batch-1 decode ≥ 70 % of the roofline: {frac:.1%} -> {'met' if frac >= 0.7 else 'NOT met'}")
    if h.get("throughput_tok_s"):
        x = d["throughput_tok_s"] / h["throughput_tok_s"]
        lines.append(f"goal: 64-request throughput ≥ 5x transformers: {x:.2f}x -> {'met' if x >= 5 else 'NOT met'}")
    for k in res.get("kernels", []):
        extra = f"  {k['vendor']}: err {k['vendor_rel_err']:.1e} {k['vendor_ms']:.3f} ms" if "vendor_ms" in k else \
            (f"  {k['vendor']}: {k['vendor_error']}" if "vendor" in k else "")
        lines.append(f"kernel {k['kernel']:55} err {k['rel_err']:.1e} {'ok' if k['rel_err'] <= 1e-2 else 'OVER 1e-2'}  "
                     f"triton {k['triton_ms']:.3f} ms  torch {k['torch_ms']:.3f} ms ({k['torch_ms'] / k['triton_ms']:.1f}x){extra}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--skip-hf", action="store_true", help="dsv3 and the roofline only")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--requests", type=int, default=64)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        fail("no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine")
    try:
        import triton  # noqa: F401
    except ImportError:
        fail("the triton package is not installed (pip install -e . installs its pinned version)")
    from dsv3.engine.cuda_graphs import enabled
    from dsv3.io.load import load_model
    from dsv3.io.tokenizer import Tokenizer

    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                 "cuda_graphs": enabled(torch.device("cuda"))}
    say(f"{res['gpu']}: measuring HBM bandwidth")
    bw = hbm_bandwidth()
    with tempfile.TemporaryDirectory() as tmp:
        say("building the random model with HF transformers")
        path = build_model(Path(tmp) / "model")
        say("loading it into dsv3 (bf16, cuda)")
        model = load_model(path, dtype="bf16", device="cuda", progress=False)
        tok = Tokenizer.from_dir(path)
        res["model"] = {"config": MODEL, "params": model.num_parameters(), "active": model.num_parameters(active=True)}
        rng = random.Random(0)
        rand = lambda n: [rng.randrange(3, MODEL["vocab_size"]) for _ in range(n)]  # noqa: E731
        d: dict = {}

        prompt, n = rand(32), 256
        eng = dsv3_engine(model, tok)
        dsv3_decode_rate(eng, prompt, n)  # warm-up: Triton compiles, CUDA graphs are captured
        d["batch1_tok_s"] = max(dsv3_decode_rate(eng, prompt, n) for _ in range(2))
        say(f"dsv3 batch-1 decode: {d['batch1_tok_s']:.1f} tok/s")
        bytes_tok = decode_bytes(model, len(prompt) + n // 2)
        res["roofline"] = {"bandwidth_gb_s": bw, "bytes_per_token": bytes_tok, "tok_s": bw * 1e9 / bytes_tok}

        prompts = [rand(128) for _ in range(args.requests)]
        dsv3_generate(eng, prompts[:8], 8)  # warm-up of the batch buckets' graphs
        d["throughput_tok_s"] = args.requests * 128 / dsv3_generate(eng, prompts, 128)
        say(f"dsv3 {args.requests}-request throughput: {d['throughput_tok_s']:.1f} tok/s")

        prefix = rand(1024)
        dsv3_generate(eng, [prefix + rand(16)], 1)  # fills the prefix cache
        ttft = []
        for _ in range(3):
            sync()
            ttft.append(dsv3_generate(eng, [prefix + rand(16)], 1) * 1e3)
        d["ttft_ms"] = statistics.median(ttft)
        d["graph_stats"] = dict(eng.runner.graphs.stats) if eng.runner.graphs is not None else None
        say(f"dsv3 TTFT with the shared prefix: {d['ttft_ms']:.1f} ms; graphs {d['graph_stats']}")
        res["engine"] = {"dsv3": d}
        del eng, model
        torch.cuda.empty_cache()

        if not args.skip_hf:
            say("loading it into HF transformers (bf16, cuda)")
            hf = HF(path)
            h: dict = {}
            hf.generate([prompt], 4)  # warm-up
            h["batch1_tok_s"] = hf.decode_rate(prompt, n)
            say(f"transformers batch-1 decode: {h['batch1_tok_s']:.1f} tok/s")
            hf.generate(prompts[:8], 4)
            h["throughput_tok_s"] = args.requests * 128 / hf.generate(prompts, 128)
            say(f"transformers {args.requests}-request throughput: {h['throughput_tok_s']:.1f} tok/s")
            h["ttft_ms"] = statistics.median(hf.generate([prefix + rand(16)], 1) * 1e3 for _ in range(3))
            res["engine"]["transformers"] = h
            del hf
            torch.cuda.empty_cache()

    if not args.skip_kernels:
        say("kernels against their references and the maintained packages")
        res["kernels"] = kernel_rows()
    res["seconds"] = time.perf_counter() - T0
    text = table(res)
    print(text)
    res["table"] = text
    report(res, args.out)
    say(f"wrote {args.out / 'gpu_bench.json'} and {args.out / 'gpu_bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
