"""Decode speed and peak memory of each system of the quantization table, each in a fresh process.

dsv3 checkpoints (float, or quantized and loaded packed by `load_quantized`) run in a worker that prefills 32
random tokens and decodes greedily with a dense latent cache, batch 1 and batch 32; llama.cpp GGUFs
run in `quant_llama.py`'s worker (batch 1 only: llama-cpp-python serves one sequence). Systems are
measured round-robin and the best of `rounds` runs is kept, since shared machines drift a lot.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
from dsv3.io.load import load_model
from dsv3.attention.context import DenseLatentCache
path, dtype = sys.argv[1], sys.argv[2]
if json.load(open(path + '/config.json')).get('quantization_config'):  # packed (FP8 stays FP8), not dequantized
    from dsv3.quant import load_quantized
    model = load_quantized(path, progress=False)
else:
    model = load_model(path, dtype=dtype, progress=False)
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
print(json.dumps({"decode_b1": b1, "decode_b32": b32, "peak_rss": peak, "model_bytes": size}))
"""


def run_worker(path: Path, dtype: str, threads: int) -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run([sys.executable, "-c", WORKER, str(path), dtype, str(threads)], capture_output=True, text=True,
                         env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_speed(rows: list[dict], threads: int, rounds: int) -> None:
    """Fresh processes, round-robin over systems, best of `rounds` (shared machines drift a lot)."""
    from quant_llama import run_speed

    for _ in range(rounds):
        for r in rows:
            path, dtype = r["run"]
            got = run_speed(Path(path), threads) if dtype == "gguf" else run_worker(Path(path), dtype, threads)
            for k, v in got.items():
                r[k] = max(r.get(k, v), v) if k.startswith("decode") else v
    for r in rows:
        r["speedup_vs_fp32"] = r["decode_b1"] / rows[0]["decode_b1"]
