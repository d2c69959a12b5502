"""Memory / speed / quality table for dsv3's quantization schemes.

    python bench/quant_table.py [--model DIR] [--text FILE] [--calib FILE] [--out bench/results/quant]

For fp32, bf16 and each scheme (int8, int4 RTN g128, AWQ int4 g128, FP8 128×128): linear-weight
bytes and their ratio to bf16, model bytes, peak RSS of a fresh process that loads the saved
checkpoint and decodes, batch-1 decode tok/s, batch-32 decode throughput, and on held-out text:
perplexity and its ratio to fp32, mean KL(fp32 ‖ scheme) of next-token distributions, top-1
agreement with fp32, and MoE routing agreement (share of (token, layer) whose chosen expert set is
unchanged). Without --model it builds "bench73m" (the engine issue's random ~73M V3-shaped model,
with a 4k-token tokenizer trained on a few stdlib modules); held-out text defaults to stdlib files
the tokenizer never saw and calibration text to ones it did. Writes table.md, results.json, table.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SCHEMES = ("int8", "int4", "awq", "fp8")
STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN_FILES = ("textwrap.py", "string.py", "shlex.py", "heapq.py", "bisect.py")
HELD_OUT_FILES = ("difflib.py", "fractions.py")
BENCH73M = dict(model_type="deepseek_v3", vocab_size=32000, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256,
                num_hidden_layers=6, num_attention_heads=8, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64,
                qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, n_group=4,
                topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=0,
                max_position_embeddings=4096, torch_dtype="float32", bos_token_id=None, eos_token_id=None)


def build_bench73m(out: Path) -> Path:
    from dsv3.checkpoint import save_model
    from dsv3.config import ModelConfig
    from dsv3.model import DeepseekV3ForCausalLM
    from dsv3.tokenizer_train import train_tokenizer

    train_tokenizer([STDLIB / f for f in TRAIN_FILES], 4096, out, min_frequency=2, model_max_length=4096, show_progress=False)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(ModelConfig.from_dict(BENCH73M))
    model.init_weights()
    save_model(model, out)
    return out


def text_windows(tok, text: str, n: int, length: int) -> torch.Tensor:
    ids = tok.encode(text, add_special_tokens=False)
    n = min(n, len(ids) // length)
    return torch.tensor(ids[: n * length]).view(n, length)


@torch.inference_mode()
def evaluate(model, windows: torch.Tensor) -> dict:
    """Per-window log-probs, next-token log-distributions and the expert sets chosen in every MoE layer."""
    moes = [blk.mlp for blk in model.model.layers if hasattr(blk.mlp, "track_load")]  # MTP does not run here
    for m in moes:
        m.track_load = True
    logp, routes = [], []
    for w in windows:
        logp.append(model(w[None]).float().log_softmax(-1)[0, :-1])
        routes.append(torch.stack([m.last_routing[1].sort(-1)[0] for m in moes]) if moes else torch.empty(0))
    return {"logp": torch.stack(logp), "routes": torch.stack(routes)}


def quality(ref: dict, got: dict, windows: torch.Tensor) -> dict:
    target = windows[:, 1:]
    nll = -got["logp"].gather(-1, target[..., None]).mean().item()
    ref_nll = -ref["logp"].gather(-1, target[..., None]).mean().item()
    kl = F.kl_div(got["logp"], ref["logp"], log_target=True, reduction="none").sum(-1).mean().item()
    top1 = (got["logp"].argmax(-1) == ref["logp"].argmax(-1)).float().mean().item()
    route = (got["routes"] == ref["routes"]).all(-1).float().mean().item() if ref["routes"].numel() else float("nan")
    return {"ppl": float(torch.tensor(nll).exp()), "ppl_ratio": float(torch.tensor(nll - ref_nll).exp()), "kl": kl,
            "top1": top1, "routing": route}


WORKER = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
from dsv3.checkpoint import load_model
from dsv3.model.attention import DenseLatentCache
path, dtype = sys.argv[1], sys.argv[2]
cfg = json.load(open(path + '/config.json'))
if cfg.get('quantization_config'):
    from dsv3.quant import load_quantized
    model = load_quantized(path, progress=False)
else:
    model = load_model(path, dtype=dtype, progress=False)
from dsv3.quant.apply import linear_weight_bytes
def decode(batch, steps, prompt=32):
    c = model.config
    cache = DenseLatentCache(c.num_hidden_layers, batch, prompt + steps + 1, c.latent_dim, model.dtype)
    ids = torch.randint(3, 1000, (batch, prompt))
    with torch.inference_mode():
        tok = model(ids, None, cache)[:, -1].argmax(-1)
        t = time.perf_counter()
        for _ in range(steps):
            tok = model(tok[:, None], None, cache)[:, -1].argmax(-1)
        return batch * steps / (time.perf_counter() - t)
decode(1, 4)
b1 = max(decode(1, 48) for _ in range(2))
b32 = decode(32, 16)
peak = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:'))
size = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
print(json.dumps({"decode_b1": b1, "decode_b32": b32, "peak_rss": peak, "model_bytes": size,
                  "linear_bytes": linear_weight_bytes(model)}))
"""


def run_worker(path: Path, dtype: str, threads: int) -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run([sys.executable, "-c", WORKER, str(path), dtype, str(threads)], capture_output=True, text=True,
                         env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def draw(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["scheme"] for r in rows]
    panels = [("linear_ratio_bf16", "linear-weight bytes / bf16"), ("decode_b1", "batch-1 decode tok/s"),
              ("decode_b32", "batch-32 decode tok/s"), ("kl", "mean KL vs fp32 (nats)"), ("top1", "top-1 agreement")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels):
        ax.bar(names, [r.get(key, 0) or 0 for r in rows], color="tab:blue")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--text", type=Path, default=None, help="held-out text (default: stdlib files the tokenizer never saw)")
    ap.add_argument("--calib", type=Path, default=None, help="AWQ calibration text (default: the tokenizer's training files)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window-len", type=int, default=256)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="speed runs per scheme (best is reported)")
    ap.add_argument("--keep-head", action="store_true", help="leave the LM head in fp32 (default: quantize it too)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/quant"))
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from dsv3.checkpoint import load_model
    from dsv3.quant import quantize_model, save_quantized
    from dsv3.quant.apply import linear_weight_bytes
    from dsv3.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="quant_table_"))
    model_dir = args.model or build_bench73m(work / "bench73m")
    tok = Tokenizer.from_dir(model_dir)
    held = args.text.read_text() if args.text else "\n".join((STDLIB / f).read_text() for f in HELD_OUT_FILES)
    calib_text = args.calib.read_text() if args.calib else "\n".join((STDLIB / f).read_text() for f in TRAIN_FILES)
    windows = text_windows(tok, held, args.windows, args.window_len)
    calib = text_windows(tok, calib_text, args.calib_samples, args.window_len)
    ref_model = load_model(model_dir, dtype="fp32", progress=False)
    bf16_linear = linear_weight_bytes(ref_model) // 2
    ref = evaluate(ref_model, windows)
    rows = [{"scheme": "fp32", **quality(ref, ref, windows)}]
    rows.append({"scheme": "bf16", **quality(ref, evaluate(load_model(model_dir, dtype="bf16", progress=False), windows), windows)})
    runs = [(model_dir, "fp32"), (model_dir, "bf16")]
    for scheme in SCHEMES:
        model = load_model(model_dir, dtype="fp32", progress=False)
        t = time.perf_counter()
        quantize_model(model, scheme, group_size=args.group_size, calib=calib if scheme == "awq" else None,
                       include_lm_head=not args.keep_head, progress=True)
        secs = time.perf_counter() - t
        row = {"scheme": {"int4": f"int4 g{args.group_size}", "awq": f"awq int4 g{args.group_size}"}.get(scheme, scheme),
               "quantize_s": secs, **quality(ref, evaluate(model, windows), windows)}
        rows.append(row)
        runs.append((save_quantized(model, work / scheme, tokenizer_from=model_dir), "fp32"))
        print(rows[-1], file=sys.stderr)
    # Speed: fresh processes, round-robin over schemes, best of `rounds` (shared machines drift a lot).
    for _ in range(args.rounds):
        for row, (path, dtype) in zip(rows, runs):
            got = run_worker(path, dtype, args.threads)
            for k, v in got.items():
                row[k] = max(row.get(k, v), v) if k.startswith("decode") else v
    for r in rows:
        r["linear_ratio_bf16"] = r["linear_bytes"] / bf16_linear
        r["speedup_vs_fp32"] = r["decode_b1"] / rows[0]["decode_b1"]
    args.out.mkdir(parents=True, exist_ok=True)
    head = ("| scheme | linear bytes / bf16 | model MiB | peak RSS MiB | decode b1 tok/s (× fp32) | decode b32 tok/s | "
            "PPL | PPL ratio | mean KL | top-1 agree | routing agree |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['scheme']} | {r['linear_ratio_bf16']:.3f} | {r['model_bytes'] / 2**20:.1f} | {r['peak_rss'] / 2**20:.0f} | "
        f"{r['decode_b1']:.1f} ({r['speedup_vs_fp32']:.2f}×) | {r['decode_b32']:.0f} | {r['ppl']:.2f} | {r['ppl_ratio']:.4f} | "
        f"{r['kl']:.5f} | {100 * r['top1']:.2f} % | {100 * r['routing']:.2f} % |\n" for r in rows)
    tied = ref_model.config.tie_word_embeddings
    lm_head = "fp32 (tied to the embedding)" if tied else "fp32" if args.keep_head else "quantized with the scheme"
    note = (f"\nHeld-out text: {windows.shape[0]} windows × {windows.shape[1]} tokens; model {model_dir}; "
            f"{args.threads} thread(s); decode speed best of {args.rounds} fresh-process runs; LM head {lm_head}, "
            f"not counted in 'linear bytes'. PPL ratio = PPL(scheme) / PPL(fp32). "
            f"KL = mean over positions of KL(fp32 ‖ scheme) in nats.\n")
    (args.out / "table.md").write_text(head + body + note)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    draw(rows, args.out / "table.png")
    print(head + body + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
