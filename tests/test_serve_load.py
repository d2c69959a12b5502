"""64 concurrent streaming clients through the bench script: every stream complete and correct; one audit line each."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path

import pytest

from dsv3.serve import ServeConfig
from dsv3.serve.audit import AuditLog, verify
from serve_harness import serve, tiny_model_dir

BENCH = Path(__file__).resolve().parents[1] / "bench" / "serve_load.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("serve_load", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


def test_64_concurrent_streams_complete_and_audited(model_dir, tmp_path):
    bench = load_bench()
    log = tmp_path / "audit.jsonl"
    cfg = ServeConfig(served_model_name="tiny", audit=AuditLog(log), keepalive_s=0.5)
    with serve(model_dir, cfg, max_num_seqs=64) as srv:
        stats = asyncio.run(bench.run_load(srv.url, concurrency=64, max_tokens=8))
    print(bench.report(stats))
    assert stats["requests"] == 64 and stats["failed"] == 0, stats["first_failure"]
    assert stats["output_tok_per_s"] > 0 and stats["ttft_p99_ms"] >= stats["ttft_p50_ms"] > 0
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(recs) == 64 + len(bench.PROMPTS)  # exactly one line per request (references + streams)
    assert all(r["status"] == 200 and r["completion_tokens"] == 8 for r in recs)
    assert len({r["request_id"] for r in recs}) == len(recs) and verify(log).ok


def test_bench_refuses_remote_targets():
    bench = load_bench()
    with pytest.raises(SystemExit, match="127.0.0.1"):
        asyncio.run(bench.run_load("http://example.com:8000"))
