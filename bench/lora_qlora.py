"""LoRA vs QLoRA (int8, int4 base): peak memory and training tokens/s of `dsv3 finetune` on the ~73M bench model.

Each method runs in a fresh process so its peak resident memory is its own. Reported per method:
resident bytes of the model (parameters + buffers: packed weights for QLoRA), RSS after setup (freed
memory handed back with malloc_trim), peak RSS during the training steps (VmHWM reset after setup; CPU)
or peak CUDA memory (GPU), peak RSS of the whole run (which includes loading the full-precision
checkpoint before it is quantized), and tokens per wall second and per CPU second (steadier on a
shared machine) over the timed steps after one warm-up step.

    nice -n 15 .venv/bin/python bench/lora_qlora.py            # writes bench/results/lora_qlora.json
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from models import make_bench_model  # noqa: E402

WORDS = ("alpha beta gamma delta river stone cloud green light sugar plant water music chair bread glass tiger "
         "house table apple window garden letter number orange purple silver yellow winter summer").split()


def write_data(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    recs = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(20, 60))]
        recs.append({"instruction": "Sort these words: " + " ".join(words), "output": " ".join(sorted(words))})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def worker(args: argparse.Namespace) -> dict:
    import torch

    from dsv3.lora.train_config import load_config
    from dsv3.lora.trainer import Trainer

    torch.set_num_threads(args.threads)
    cfg = load_config(None, dict(model=str(args.model), data_files=[str(args.data)], output_dir=str(args.tmp / args.worker),
                                 batch_size=args.micro_batch, micro_batch_size=args.micro_batch, lora_rank=args.rank,
                                 max_seq_len=args.seq_len, train_steps=args.steps + 1, learning_rate=1e-4, plot=False,
                                 quantization=args.worker, group_size=args.group_size, device=args.device))
    trainer = Trainer(cfg, log=lambda *a: None)
    model_bytes = sum(t.numel() * t.element_size() for t in list(trainer.model.parameters()) + list(trainer.model.buffers()))
    cuda = trainer.device.type == "cuda"
    setup_peak = _status("VmHWM")  # setup: loading the fp32 checkpoint, then quantizing it
    try:  # hand the freed fp32 weights back to the OS, so RSS counts live memory only
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    rss_setup = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak below is the training phase's
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train_step()  # warm-up
    tokens, t0, c0 = 0, time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        tokens += trainer.train_step()["tokens"]
    if cuda:
        torch.cuda.synchronize()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    train_peak = _status("VmHWM")
    out = {"method": args.worker, "model_bytes": model_bytes, "rss_after_setup": rss_setup, "train_peak_rss": train_peak,
           "run_peak_rss": max(setup_peak, train_peak),
           "tokens_per_s": tokens / elapsed, "tokens_per_cpu_s": tokens / cpu, "tokens": tokens, "seconds": elapsed,
           "cpu_seconds": cpu}
    if cuda:
        out["train_peak_cuda"] = torch.cuda.max_memory_allocated()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--methods", default="none,int8,int4")
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps (after one warm-up step)")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dsv3-bench")
    ap.add_argument("--out", type=Path, default=Path("bench/results/lora_qlora.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    import tempfile

    model = args.model or make_bench_model(args.cache / "bench73m")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp) / "train.jsonl", 64)
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--worker", method, "--model", str(model), "--data", str(data), "--tmp", tmp,
                   "--steps", str(args.steps), "--micro-batch", str(args.micro_batch), "--seq-len", str(args.seq_len),
                   "--rank", str(args.rank), "--group-size", str(args.group_size), "--threads", str(args.threads),
                   "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"model": str(model), "settings": {k: getattr(args, k) for k in ("steps", "micro_batch", "seq_len", "rank", "group_size",
                                                                              "threads", "device")}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    mib = 1 << 20
    print("| method | model tensors (MiB) | RSS after setup (MiB) | peak RSS, training (MiB) | peak RSS, whole run (MiB) | tokens/s | tokens/CPU-s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        name = "LoRA (fp32 base)" if r["method"] == "none" else f"QLoRA ({r['method']} base)"
        print(f"| {name} | {r['model_bytes'] / mib:.0f} | {r['rss_after_setup'] / mib:.0f} | {r['train_peak_rss'] / mib:.0f} | "
              f"{r['run_peak_rss'] / mib:.0f} | "
              f"{r['tokens_per_s']:.0f} | {r['tokens_per_cpu_s']:.0f} |")


if __name__ == "__main__":
    main()
