"""Peak memory per rank with TP = 2 is at most 0.6× one process on the ~73M bench model (slow).

Each process measures its peak RSS increase across loading and a 256-token prefill with the
last position's logits (what the engine computes), in fresh processes. The baseline is taken once
the runtime is warm: torch's lazy imports on first meta-device use (~180 MiB here) and the first
collective cost the same in every process whatever its share of the model, so they are excluded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys, torch
import torch.multiprocessing as mp
from dsv3.io.load import load_model
from dsv3.config import ModelConfig
from dsv3.models.deepseek_v3 import DeepseekV3ForCausalLM
from dsv3.parallel import ParallelConfig, dist as pdist
from dsv3.parallel.load import load_sharded, rss

def measure(load, path):
    torch.set_num_threads(1)
    with torch.device("meta"):
        DeepseekV3ForCausalLM(ModelConfig.from_dir(path))
    pdist.all_reduce(torch.ones(8))
    base = rss()
    model = load()
    with torch.inference_mode():
        model.lm_head(model.hidden_states(torch.arange(256)[None] % 1000)[:, -1])
    return rss("VmHWM") - base

def rank_main(rank, port, path, out):
    pdist.init(rank, 2, "cpu", "127.0.0.1", port)
    peak = measure(lambda: load_sharded(path, ParallelConfig(2, 1, rank), "fp32", progress=False), path)
    pdist.shutdown()
    open(f"{out}.{rank}", "w").write(str(peak))

if __name__ == "__main__":
    mode, path, out = sys.argv[1:]
    if mode == "single":
        print(json.dumps([measure(lambda: load_model(path, dtype="fp32", progress=False), path)]))
    else:
        mp.spawn(rank_main, args=(pdist.free_port(), path, out), nprocs=2)
        print(json.dumps([int(open(f"{out}.{r}").read()) for r in range(2)]))
"""


@pytest.mark.slow
def test_tp2_peak_memory_per_rank(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from models import make_bench_model

    path = make_bench_model(tmp_path / "bench73m")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}

    def run(mode: str) -> list[int]:
        r = subprocess.run([sys.executable, str(probe), mode, str(path), str(tmp_path / "peak")],
                           capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    single = run("single")[0]
    ranks = run("tp2")
    print(f"single {single / 2**20:.1f} MiB, TP=2 ranks {[round(p / 2**20, 1) for p in ranks]} MiB")
    assert max(ranks) <= 0.6 * single
