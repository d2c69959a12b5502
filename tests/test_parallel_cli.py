"""`--tensor-parallel-size 2` through the real entry points: `dsv3 generate` and `dsv3 serve` (2 processes, gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsv3 import LLM, SamplingParams
from tiny_model import make_tiny_model_dir

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tpcli"))


def test_generate_tp2_equals_one_process(model_dir):
    expected = LLM(model_dir, dtype="fp32").generate("def main():", SamplingParams(max_tokens=10, temperature=0))[0].outputs[0].text
    with socket.socket() as s:  # the rendezvous port, chosen (--master-port) rather than found free by dsv3
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "dsv3", "generate", "--model", str(model_dir), "--dtype", "fp32",
                        "--tensor-parallel-size", "2", "--master-port", str(port), "--max-tokens", "10", "def main():"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"


@pytest.mark.slow
def test_serve_tp2_answers_openai_sdk(model_dir):
    import httpx
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dsv3", "serve", "--model", str(model_dir), "--dtype", "fp32",
                             "--tensor-parallel-size", "2", "--port", str(port), "--served-model-name", "tiny"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(1)
        else:
            pytest.fail("server did not become healthy")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
        messages = [{"role": "user", "content": "hello"}]
        llm = LLM(model_dir, dtype="fp32")
        expected = llm.chat(messages, SamplingParams(max_tokens=12, temperature=0))[0].outputs[0].text
        got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
        assert got.choices[0].message.content == expected
        stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
        # A rank that dies: the next request fails, /health turns 503, and the server exits on its own.
        workers = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "multiprocessing.spawn"], capture_output=True, text=True).stdout.split()
        assert workers
        os.kill(int(workers[0]), 9)
        with pytest.raises(openai.APIError):
            client.with_options(max_retries=0).chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 503
        assert proc.wait(timeout=60) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=60)
