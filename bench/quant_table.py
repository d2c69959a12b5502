"""Memory / speed / quality table for dsv3's quantization schemes, next to llama.cpp's.

    python bench/quant_table.py --model src/dsv3/data/default      # the embedded default model
    python bench/quant_table.py                                     # the random ~73M bench model
    options: --shards DIR --text FILE --calib FILE --anchors llama-f16,llama-q8_0,llama-q4_k_m --no-speed

Rows: dsv3 fp32 (the reference), bf16, int8, int4 g128 round-to-nearest, AWQ int4 g128, FP8 128×128,
and llama.cpp F16 / Q8_0 / Q4_K_M conversions of the same checkpoint (`quant_llama.py`). Columns:
linear-weight bytes relative to bf16, checkpoint bytes on disk relative to the bf16 checkpoint (whole
directory: config, tokenizer, every tensor; GGUF: the file against the F16 file), model bytes, peak RSS of a fresh process that loads the saved
checkpoint and decodes, batch-1 decode tok/s, batch-32 decode throughput, and on held-out text:
perplexity and its ratio to fp32, mean KL(fp32 ‖ system), top-1 agreement with fp32, MoE routing
agreement (`quant_metrics.py`). Held-out text: the `heldout` split of the shards the model trained on
(`--shards`, default the `data` of the model's pretrain.yaml), AWQ calibration on its `train` split
(`quant_data.py`). Without --model it builds "bench73m" (random weights, a 4k-token tokenizer trained
on a few stdlib modules; held-out = stdlib files the tokenizer never saw). Writes table.md,
results.json and table.png to --out (default bench/results/quant/<default|bench73m|model dir name>).
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from quant_data import BenchDataError, check_tokenizer, shard_windows, shards_of, text_windows  # noqa: E402
from quant_metrics import dsv3_system, logits_system, score  # noqa: E402
from quant_speed import measure_speed  # noqa: E402

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
    from dsv3.io.checkpoint import save_model
    from dsv3.config import ModelConfig
    from dsv3.models.deepseek_v3 import DeepseekV3ForCausalLM
    from dsv3.data.tokenizer_train import train_tokenizer

    train_tokenizer([STDLIB / f for f in TRAIN_FILES], 4096, out, min_frequency=2, model_max_length=4096, show_progress=False)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(ModelConfig.from_dict(BENCH73M))
    model.init_weights()
    save_model(model, out)
    return out


def token_windows(args, model_dir: Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(held-out windows, calibration windows, a sentence saying where they come from)."""
    from dsv3.io.tokenizer import Tokenizer

    shards = args.shards or (shards_of(model_dir) if args.model else None)
    if args.text is None and shards is not None:
        check_tokenizer(shards, model_dir)
        held = shard_windows(shards, "heldout", 256 if args.windows is None else args.windows, args.window_len)
        calib = shard_windows(shards, "train", args.calib_samples, args.calib_len) if args.calib is None else None
        where = f"held-out split of {shards}"
    elif args.text is None and args.model is not None:
        raise BenchDataError(f"no shard directory for {model_dir}: pass --shards DIR (the data it trained on) or --text FILE")
    else:
        held, calib = None, None
        where = str(args.text) if args.text else "stdlib " + ", ".join(HELD_OUT_FILES)
    tok = Tokenizer.from_dir(model_dir)
    if held is None:
        text = args.text.read_text() if args.text else "\n".join((STDLIB / f).read_text() for f in HELD_OUT_FILES)
        held = text_windows(tok, text, args.windows or 8, args.window_len)
    if calib is None:
        text = args.calib.read_text() if args.calib else "\n".join((STDLIB / f).read_text() for f in TRAIN_FILES)
        calib = text_windows(tok, text, args.calib_samples, args.calib_len)
    return held, calib, where


def dsv3_rows(args, model_dir: Path, calib: torch.Tensor, work: Path) -> tuple[list[dict], dict]:
    """Rows (sizes, checkpoint to time) and scoring functions of dsv3's float and quantized models."""
    from dsv3.io.checkpoint import save_model
    from dsv3.io.load import load_model
    from dsv3.quant import quantize_model, save_quantized
    from dsv3.quant.apply import default_policy, linear_weight_bytes

    def row(name: str, model, run: list[str], **extra) -> dict:
        systems[name] = dsv3_system(model)
        return {"scheme": name, "run": run, "linear_bytes": linear_weight_bytes(model),
                "model_bytes": sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())), **extra}

    systems: dict = {}
    fp32, bf16 = (load_model(model_dir, dtype=d, progress=False) for d in ("fp32", "bf16"))
    disk = {d: dir_bytes(save_model(m, work / d, tokenizer_from=model_dir)) for d, m in (("fp32", fp32), ("bf16", bf16))}
    rows = [row("fp32", fp32, [str(model_dir), "fp32"], disk_bytes=disk["fp32"]),
            row("bf16", bf16, [str(model_dir), "bf16"], disk_bytes=disk["bf16"])]  # bf16: the checkpoint as released
    g = args.group_size
    for scheme in SCHEMES:
        model = load_model(model_dir, dtype="fp32", progress=False)
        head, embedding = default_policy(scheme)  # what `dsv3 quantize --method SCHEME` does by default
        if args.embedding is not None and scheme != "fp8":
            embedding = False if args.embedding == "keep" else args.embedding
        t = time.perf_counter()
        quantize_model(model, scheme, group_size=g, calib=calib if scheme == "awq" else None,
                       include_lm_head=False if args.keep_head else head, embedding=embedding or False, progress=True)
        secs = time.perf_counter() - t
        path = save_quantized(model, work / scheme, tokenizer_from=model_dir)
        rows.append(row({"int4": f"int4 g{g} (RTN)", "awq": f"AWQ int4 g{g}"}.get(scheme, scheme), model, [str(path), "fp32"],
                        quantize_s=secs, disk_bytes=dir_bytes(path), embedding=embedding or "bf16"))
    for r in rows:
        r["linear_ratio_bf16"] = r["linear_bytes"] / rows[1]["linear_bytes"]
        r["disk_ratio_bf16"] = r["disk_bytes"] / rows[1]["disk_bytes"]
    return rows, systems


def dir_bytes(path: Path) -> int:
    """Bytes of every file of a checkpoint directory (weights, config, tokenizer)."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def llama_rows(args, model_dir: Path, window_len: int) -> tuple[list[dict], dict]:
    from quant_llama import ANCHORS, LABELS, LlamaScorer, linear_ratio, make_gguf

    rows, systems = [], {}
    for a in filter(None, args.anchors.split(",")):
        if a not in ANCHORS:
            raise BenchDataError(f"unknown anchor {a!r} (use {', '.join(ANCHORS)})")
        gguf = make_gguf(model_dir, ANCHORS[a], args.cache, args.threads)
        systems[LABELS[a]] = logits_system(LlamaScorer(gguf, window_len, args.threads))
        rows.append({"scheme": LABELS[a], "run": [str(gguf), "gguf"], "linear_ratio_bf16": linear_ratio(gguf, args.cache),
                     "model_bytes": gguf.stat().st_size, "disk_bytes": gguf.stat().st_size})
    f16 = next((r["disk_bytes"] for r in rows if r["scheme"] == LABELS["llama-f16"]), None)
    for r in rows:
        r["disk_ratio_bf16"] = r["disk_bytes"] / f16 if f16 else None
    return rows, systems


def fmt(v, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "—" if v is None or v != v else f"{v * scale:{spec}}{suffix}"


def speed(r: dict) -> str:
    return "—" if r.get("decode_b1") is None else f"{r['decode_b1']:.1f} ({r['speedup_vs_fp32']:.2f}×)"


def write_table(rows: list[dict], out: Path, note: str) -> str:
    head = ("| system | linear bytes / bf16 | file / bf16 file | model MiB | peak RSS MiB | decode b1 tok/s (× fp32) | decode b32 tok/s | "
            "PPL | PPL ratio | mean KL | top-1 agree | routing agree |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['scheme']} | {r['linear_ratio_bf16']:.3f} | {fmt(r.get('disk_ratio_bf16'), '.3f')} | {r['model_bytes'] / 2**20:.1f} | {fmt(r.get('peak_rss'), '.0f', 2**-20)} | "
        f"{speed(r)} | "
        f"{fmt(r.get('decode_b32'), '.0f')} | {r['ppl']:.2f} | {r['ppl_ratio']:.4f} ± {r['ppl_ratio_se']:.4f} | {r['kl']:.5f} | {100 * r['top1']:.2f} % | "
        f"{fmt(r['routing'], '.2f', 100, ' %')} |\n" for r in rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(head + body + note)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    draw(rows, out / "table.png")
    return head + body + note


def draw(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["scheme"] for r in rows]
    panels = [("linear_ratio_bf16", "linear-weight bytes / bf16"), ("disk_ratio_bf16", "checkpoint file / bf16 file"), ("decode_b1", "batch-1 decode tok/s"),
              ("ppl_ratio", "perplexity ratio to fp32"), ("kl", "mean KL(fp32 ‖ system), nats"), ("top1", "top-1 agreement")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    colors = ["tab:orange" if n.startswith("llama") else "tab:blue" for n in names]
    for ax, (key, title) in zip(axes, panels):
        vals = [r.get(key) if r.get(key) is not None else 0 for r in rows]
        ax.bar(names, vals, color=colors)
        if key == "ppl_ratio":
            ax.set_ylim(min(vals) - 0.002, max(vals) + 0.002)
        if key == "top1":
            ax.set_ylim(min(vals) - 0.01, 1.0)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: build the random bench73m model)")
    ap.add_argument("--shards", type=Path, default=None, help="shards the model trained on (default: its pretrain.yaml's data)")
    ap.add_argument("--text", type=Path, default=None, help="held-out text file instead of the shards' held-out split")
    ap.add_argument("--calib", type=Path, default=None, help="AWQ calibration text instead of the shards' train split")
    ap.add_argument("--windows", type=int, default=None,
                    help="held-out windows (default 256 spread over the shards' held-out split, 0 = all of it; 8 of a text)")
    ap.add_argument("--window-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=128, help="AWQ calibration windows (AutoAWQ's 128 × 512)")
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--anchors", default="llama-f16,llama-q8_0,llama-q4_k_m", help="llama.cpp rows ('' for none)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="speed runs per system (best is reported)")
    ap.add_argument("--no-speed", action="store_true", help="skip the decode-speed / peak-RSS processes")
    ap.add_argument("--keep-head", action="store_true", help="leave an untied LM head in fp32 (default: quantize it too)")
    ap.add_argument("--embedding", choices=("int8", "int4", "keep"), default=None,
                    help="token embedding of the int8/int4/AWQ rows (default: dsv3 quantize's: int8, int4 beside int4)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dsv3-bench", help="GGUFs and llama.cpp's source")
    ap.add_argument("--out", type=Path, default=None)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="quant_table_"))
    model_dir = args.model or build_bench73m(work / "bench73m")
    try:
        held, calib, where = token_windows(args, model_dir)
    except BenchDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows, systems = dsv3_rows(args, model_dir, calib, work)
    more, anchors = llama_rows(args, model_dir, held.shape[1])
    rows, systems = rows + more, {**systems, **anchors}
    got = score(systems.pop("fp32"), systems, held)
    for r in rows:
        r.update(got["reference" if r["scheme"] == "fp32" else r["scheme"]])
    if not args.no_speed:
        measure_speed(rows, args.threads, args.rounds)
    tied = json.loads((model_dir / "config.json").read_text()).get("tie_word_embeddings", False)
    head = ("quantized (untied from the embedding): int8 for the int8 and int4 schemes, as llama.cpp's Q4_K_M keeps its "
            "output matrix at Q6_K and Q8_0 at Q8_0; fp8 for fp8" if not args.keep_head
            else "fp32 (tied to the embedding)" if tied else "fp32")
    note = (f"\nModel {model_dir}. Held-out: {held.shape[0]} windows × {held.shape[1]} tokens of the {where}; AWQ calibrated "
            f"on {calib.shape[0]} × {calib.shape[1]} training tokens. PPL ratio = PPL(system) / PPL(dsv3 fp32) ± its standard "
            f"error over windows; KL = mean over positions of KL(dsv3 fp32 ‖ system) in nats; top-1 = share of positions with "
            f"the same argmax as dsv3 fp32. llama.cpp scored with an F32 KV cache (weights alone differ), timed with its "
            f"default F16 cache. LM head {head}, not counted in 'linear bytes'. Token embedding: "
            + ", ".join(f"{r['scheme']} {r['embedding']}" for r in rows if "embedding" in r)
            + " (dsv3 quantize's defaults unless --embedding); tensors left unquantized stored bf16 (norms, router fp32). "
            "'file / bf16 file': the saved checkpoint directory over the bf16 one (llama.cpp: the GGUF over its F16 GGUF). "
            + ("Speed columns not measured (--no-speed).\n" if args.no_speed else
               f"Decode: {args.threads} thread(s), best of {args.rounds} fresh-process runs.\n"))
    print(write_table(rows, args.out or Path("bench/results/quant") / (model_dir.resolve().name if args.model else "bench73m"), note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
