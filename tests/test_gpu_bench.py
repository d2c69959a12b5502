"""bench/gpu_bench.py without a GPU: one clear line and exit 2; its model is the size the issue asks for; the report
it ends with (table, JSON, PNG) works on a result of the shape it collects, so an 8-minute GPU run cannot die at
its last step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_without_cuda_it_is_one_line_and_exit_2():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_bench.py")], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "gpu_bench: error: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine"]


def test_the_model_is_a_1_to_2b_parameter_v3_shape():
    from gpu_bench import MODEL

    from dsv3.config import ModelConfig
    from dsv3.models.deepseek_v3 import DeepseekV3ForCausalLM

    cfg = ModelConfig.from_dict({"model_type": "deepseek_v3", **MODEL})
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg)
    total, active = model.num_parameters(), model.num_parameters(active=True)
    assert 1.0e9 < total < 2.0e9 and active < total / 2
    from dsv3.ops.triton.router import supported

    assert supported(cfg.n_routed_experts, cfg.n_group)  # the Triton router takes this layout


def test_report_from_a_result(tmp_path):
    from gpu_bench import report, table

    res = {"gpu": "NVIDIA H100 80GB HBM3", "model": {"params": 1.72e9, "active": 0.56e9},
           "roofline": {"bandwidth_gb_s": 3000.0, "bytes_per_token": 1.1e9, "tok_s": 2727.0},
           "engine": {"dsv3": {"batch1_tok_s": 2000.0, "throughput_tok_s": 30000.0, "ttft_ms": 20.0},
                      "transformers": {"batch1_tok_s": 40.0, "throughput_tok_s": 3000.0, "ttft_ms": 80.0}},
           "kernels": [{"kernel": "MLA decode dense", "rel_err": 3e-3, "triton_ms": 0.1, "torch_ms": 1.0, "bytes": 1,
                        "vendor": "FlashMLA", "vendor_rel_err": 2e-3, "vendor_ms": 0.08},
                       {"kernel": "FP8 block GEMM", "rel_err": 2e-2, "triton_ms": 0.2, "torch_ms": 0.3, "bytes": 1}]}
    text = table(res)
    assert "goal: batch-1 decode ≥ 70 % of the roofline: 73.3% -> met" in text
    assert "goal: 64-request throughput ≥ 5x transformers: 10.00x -> NOT met" not in text and "10.00x -> met" in text
    assert "OVER 1e-2" in text and "FlashMLA: err 2.0e-03" in text
    report(res, tmp_path)
    assert json.loads((tmp_path / "gpu_bench.json").read_text())["gpu"] == res["gpu"]
    assert (tmp_path / "gpu_bench.png").read_bytes()[:4] == b"\x89PNG"
