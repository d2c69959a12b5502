"""Peak RSS while loading a ~1 GB checkpoint stays within 1.3× the model's in-memory size (slow)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_loading_1gb_checkpoint_peak_rss():
    bench = Path(__file__).resolve().parents[1] / "bench" / "load_memory.py"
    r = subprocess.run([sys.executable, str(bench), "--params-mb", "1024", "--no-hf"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    ratio = json.loads(r.stdout.strip().splitlines()[-1])["dsv3"]
    assert ratio <= 1.3, r.stdout
