"""The CPU overlay's server, started as its pod would start it (same flags, same environment; paths moved to a
temporary directory): the image's HEALTHCHECK script follows it from loading to ready, a key from the API-key
Secret is required, /metrics carries the series the HPA scales on (through the prometheus-adapter rule), it
stops cleanly on SIGTERM within the pod's grace period, and the audit log it wrote verifies."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import yaml

from deploy_kit import DEPLOY, K8S, SHUTDOWN_MARGIN, materialize, pods, rendered


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthcheck(pid: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py"), "--pid", str(pid)],
                          capture_output=True, text=True, timeout=30)


def adapter_names(exposition: str) -> set[str]:
    """The custom-metric names prometheus-adapter would serve for these series, per its rule in extras/."""
    rule = yaml.safe_load((K8S / "extras" / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"][0]
    wanted = re.fullmatch(r'\{__name__=~"([^"]+)".*\}', rule["seriesQuery"]).group(1)
    series = {line.split("{")[0].split(" ")[0] for line in exposition.splitlines() if line and not line.startswith("#")}
    matches, as_ = rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1")
    return {re.sub(matches, as_, s) for s in series if re.fullmatch(wanted, s)}


def test_cpu_overlay_server_runs_as_its_pod_would(tmp_path):
    pod = next(p for p in pods(rendered("cpu")) if p.statefulset["metadata"]["name"] == "dsv3")
    argv = materialize(pod, tmp_path)
    assert "--port=8000" in argv
    port = free_port()
    argv = [f"--port={port}" if a == "--port=8000" else a for a in argv]
    key = "sk-deploy-test"
    keys = next(a.split("=", 1)[1] for a in argv if a.startswith("--api-key-file="))
    with open(keys, "a") as f:  # the example Secret's placeholder line stays: it matches no key
        f.write(f"test:{hashlib.sha256(key.encode()).hexdigest()}\n")
    audit = next(a.split("=", 1)[1] for a in argv if a.startswith("--audit-log="))
    env = {**os.environ, **pod.env, "HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "dsv3", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = healthcheck(proc.pid)
        assert first.returncode == 1, first.stdout  # loading (or not listening yet)
        assert f"https://127.0.0.1:{port}/health" in first.stdout  # port and scheme from the server's own flags
        deadline = time.monotonic() + 120
        while healthcheck(proc.pid).returncode != 0:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the server did not become healthy"
            time.sleep(0.5)
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=False, timeout=60) as client:
            body = {"model": "dsv3", "prompt": "def add(a, b):", "max_tokens": 4, "temperature": 0}
            assert client.post("/v1/completions", json=body).status_code == 401
            assert client.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
            ok = client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200, ok.text
            assert ok.json()["usage"]["completion_tokens"] == 4
            metrics = client.get("/metrics")
            assert metrics.status_code == 200
        hpa = yaml.safe_load((K8S / "autoscaling" / "hpa.yaml").read_text())
        assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} <= adapter_names(metrics.text)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        grace = pod.spec["terminationGracePeriodSeconds"] - pod.container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert rc == 0 and time.monotonic() - t0 < grace - SHUTDOWN_MARGIN / 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    verify = subprocess.run([sys.executable, "-m", "dsv3", "audit", "verify", audit], capture_output=True, text=True, env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    lines = int(re.search(r"OK, (\d+) lines", verify.stdout).group(1))
    assert lines >= 3  # the two refused calls and the answered one (probes and /metrics too)


def test_healthcheck_reads_the_servers_own_flags():
    sys.path.insert(0, str(DEPLOY))
    try:
        from healthcheck import serve_flags
    finally:
        sys.path.remove(str(DEPLOY))
    assert serve_flags(["/opt/dsv3/venv/bin/python", "/opt/dsv3/venv/bin/dsv3", "serve", "--host", "0.0.0.0"]) == (8000, False)
    assert serve_flags(["dsv3", "serve", "--port", "9000", "--tls-certfile", "/c", "--tls-keyfile", "/k"]) == (9000, True)
    torchrun = ["python", "torchrun", "--nnodes=2", "--master-port=29500", "-m", "dsv3", "serve", "--port=8443",
                "--tls-certfile=/etc/dsv3/tls/tls.crt"]
    assert serve_flags(torchrun) == (8443, True)  # --master-port is not --port
