"""`dsv3 serve` as a real process: kill -9 mid-load keeps the audit log whole; SIGTERM finishes in-flight work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from dsv3.serve.audit import verify
from serve_harness import free_port, tiny_model_dir

pytestmark = pytest.mark.slow  # two server processes, ~35 s on two cores

SRC = str(Path(__file__).resolve().parents[1] / "src")
LAUNCH = ("import argparse, sys; from dsv3.commands.serve import register; p = argparse.ArgumentParser(); "
          "register(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


def start(model_dir: Path, port: int, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "serve", "--model", str(model_dir), "--port", str(port),
                             "--served-model-name", "tiny", "--max-model-len", "512", "--kv-cache-memory", "64", *flags],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the server did not become healthy"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def test_kill_9_mid_load_leaves_whole_chained_audit_log(model_dir, tmp_path):
    port, log = free_port(), tmp_path / "audit.jsonl"
    proc = start(model_dir, port, "--audit-log", str(log))
    completed: list[str] = []
    stop = threading.Event()

    def worker(i: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            while not stop.is_set():
                try:
                    r = c.post("/v1/completions", json={"prompt": f"x{i}", "max_tokens": 24, "ignore_eos": True})
                except httpx.TransportError:
                    return
                if r.status_code == 200:
                    completed.append(r.headers["x-request-id"])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(completed) < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    stop.set()
    for t in threads:
        t.join(30)
    assert len(completed) >= 12
    data = log.read_bytes()
    assert data.endswith(b"\n")  # no torn line
    logged = {json.loads(line)["request_id"] for line in data.splitlines()}
    assert set(completed) <= logged  # every answer a client holds is in the log
    assert verify(log).ok


def test_sigterm_finishes_in_flight_request(model_dir, tmp_path):
    port, log = free_port(), tmp_path / "audit.jsonl"
    proc = start(model_dir, port, "--audit-log", str(log), "--grace-period", "20")
    body = {"prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
    text, done = "", False
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    proc.send_signal(signal.SIGTERM)  # mid-stream
                    break
            for line in lines:
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
    assert done and proc.wait(30) == 0
    with pytest.raises(httpx.TransportError):  # no longer accepting
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert recs[-1]["route"] == "/v1/completions" and recs[-1]["status"] == 200 and recs[-1]["completion_tokens"] == 200
    assert verify(log).ok
