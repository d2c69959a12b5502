"""guidellm (vLLM's load tool) against a dsv3 test server: 64 concurrent streams, 128 requests, 0 errors.

Slow: guidellm lives in a venv of its own (`make guidellm-venv`, bench/requirements-guidellm.txt: it pins
click~=8.4 and pulls sanic), layered on this interpreter's packages. The server runs the embedded default
chat model on CPU; guidellm makes synthetic prompts of 64 tokens with the model's own tokenizer (read
from the model directory, offline) and asks for 32 output tokens each, streamed, on /v1/completions and
/v1/chat/completions. It prints TTFT and ITL percentiles (docs/serve.md records a run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsv3.io.paths import default_model_dir
from dsv3.serve import ServeConfig
from serve_harness import serve

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "bench" / ".venv-guidellm"
STREAMS, REQUESTS, PROMPT_TOKENS, OUTPUT_TOKENS = 64, 128, 64, 32


@pytest.fixture(scope="module")
def guidellm() -> Path:
    res = subprocess.run(["make", "-s", "guidellm-venv", f"GUIDELLM_BASE={sys.executable}"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return VENV / "bin" / "guidellm"


@pytest.fixture(scope="module")
def chat_srv():
    cfg = ServeConfig(served_model_name="default-chat", max_queue=4 * STREAMS)
    with serve(default_model_dir(chat=True), cfg, max_model_len=512, max_num_seqs=STREAMS) as s:
        yield s


def percentiles(metric: dict) -> dict[str, float]:
    p = metric["successful"]["percentiles"]
    return {k: round(p[k], 1) for k in ("p50", "p90", "p95", "p99")}


@pytest.mark.slow
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_guidellm_64_concurrent_streams_without_errors(guidellm, chat_srv, tmp_path, route):
    out = tmp_path / "guidellm.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [str(guidellm), "run", "--disable-console-interactive",
           "--backend", f"kind=openai_http,target={chat_srv.url},model=default-chat,request_format={route}",
           "--profile", f"kind=concurrent,streams={STREAMS}", "--constraint", f"kind=max_requests,count={REQUESTS}",
           "--tokenizer", f"kind=hf_auto,model={default_model_dir(chat=True)}",
           "--data", f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},output_tokens={OUTPUT_TOKENS}",
           "--output", f"kind=json,path={out}"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    bench = json.loads(out.read_text())["benchmarks"][0]
    m = bench["metrics"]
    assert m["request_totals"] == {"successful": REQUESTS, "errored": 0, "incomplete": 0, "total": REQUESTS}
    assert bench["config"]["strategy"]["streams"] == STREAMS
    assert m["request_concurrency"]["successful"]["max"] == STREAMS  # 64 streams really were open at once
    assert m["output_token_count"]["successful"]["min"] == m["output_token_count"]["successful"]["max"] == OUTPUT_TOKENS
    assert m["request_streaming_iterations_count"]["successful"]["min"] > OUTPUT_TOKENS // 2  # streamed, not at once
    assert chat_srv.state.inflight == 0
    ttft, itl = percentiles(m["time_to_first_token_ms"]), percentiles(m["inter_token_latency_ms"])
    print(f"guidellm {route}: {STREAMS} streams, {REQUESTS} requests of {PROMPT_TOKENS}+{OUTPUT_TOKENS} tokens, "
          f"0 errors in {bench['duration']:.1f} s; {m['output_tokens_per_second']['successful']['mean']:.0f} output tok/s; "
          f"TTFT ms {ttft}; ITL ms {itl}")
    assert 0 < ttft["p50"] <= ttft["p99"] and 0 < itl["p50"] <= itl["p99"]
