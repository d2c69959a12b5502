"""Under torchrun (env:// rendezvous, as across hosts) the engine gives one process's greedy output (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys
from dsv3.parallel.worker import start_engine
from dsv3.engine.sampling import SamplingParams
handle = start_engine(sys.argv[1], 2, 2, dtype="fp32", progress=False)
if handle is not None:
    with handle:
        outs = handle.engine.generate([{"prompt_token_ids": [5, 17, 33]}, {"prompt_token_ids": [44, 9, 250, 3]}],
                                      SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    print("RESULT " + json.dumps([o.outputs[0].token_ids for o in outs]), flush=True)
"""


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tmp_path):
    from tiny_model import make_tiny_model_dir

    from dsv3.llm import LLM
    from dsv3.parallel.dist import free_port
    from dsv3.engine.sampling import SamplingParams

    model = make_tiny_model_dir(tmp_path / "tiny")
    ref = LLM(model, dtype="fp32").generate([{"prompt_token_ids": [5, 17, 33]}, {"prompt_token_ids": [44, 9, 250, 3]}],
                                            SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), use_tqdm=False)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script), str(model)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1  # only rank 0 drives the engine
    assert json.loads(lines[0][7:]) == [o.outputs[0].token_ids for o in ref]
    assert "rank 1: weights" in r.stderr and "rank 0: weights" in r.stderr  # memory per rank printed
