"""API keys, the audit log, TLS, rate limits, body and queue bounds, and /health while loading."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import ssl
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest

from dsv3.commands.serve import run_audit_verify
from dsv3.serve import ServeConfig
from dsv3.serve.audit import AuditLog, verify
from dsv3.serve.auth import APIKeys, KeyFileError
from dsv3.serve.ratelimit import RateLimit, RateLimiter, RateLimitSpecError
from serve_harness import client, serve, tiny_loader, tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


def audit_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_keys_audit_and_tamper_detection(model_dir, tmp_path, capsys):
    key_file = tmp_path / "keys"
    key_file.write_text("# hashed keys\nalice:" + hashlib.sha256(b"s3cret-alice").hexdigest() + "\n")
    log = tmp_path / "audit.jsonl"
    cfg = ServeConfig(served_model_name="tiny", keys=APIKeys.build(["plain-key"], key_file), audit=AuditLog(log))
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2, "temperature": 0}
    with serve(model_dir, cfg) as srv, client(srv) as c:
        assert c.post("/v1/completions", json=body).status_code == 401
        assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = c.post("/v1/completions", content=json.dumps(body).encode(),
                    headers={"Authorization": "Bearer s3cret-alice", "content-type": "application/json"})
        assert ok.status_code == 200
        sdk = openai.OpenAI(base_url=srv.url + "/v1", api_key="plain-key", max_retries=0)
        assert sdk.completions.create(model="tiny", prompt="x", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
        assert c.get("/health").status_code == 200  # public unless --protect-health-metrics
        assert c.get("/metrics").status_code == 200
    recs = audit_lines(log)
    assert [r["status"] for r in recs] == [401, 401, 200, 200, 401, 200, 200]
    assert [r["route"] for r in recs[:3]] == ["/v1/completions"] * 3
    assert recs[2]["key_id"] == "alice" and recs[0]["key_id"] is None
    assert recs[2]["body_sha256"] == hashlib.sha256(json.dumps(body).encode()).hexdigest()
    assert recs[2]["prompt_tokens"] > 0 and recs[2]["completion_tokens"] == 2 and recs[2]["model"] == "tiny"
    assert "s3cret" not in log.read_text() and "plain-key" not in log.read_text()
    assert recs[2]["request_id"] == ok.headers["x-request-id"]
    assert verify(log).ok and verify(log).lines == 7

    lines = log.read_text().splitlines(keepends=True)
    edited = lines[:]
    edited[3] = edited[3].replace('"status":200', '"status":500')
    log.write_text("".join(edited))
    r = verify(log)
    assert not r.ok and r.bad_line == 4 and "altered" in r.reason
    assert run_audit_verify(SimpleNamespace(path=str(log))) == 1
    assert "line 4" in capsys.readouterr().out
    log.write_text("".join(lines[:2] + lines[3:]))  # delete line 3
    r = verify(log)
    assert not r.ok and r.bad_line == 3 and "removed" in r.reason
    log.write_text("".join([lines[1], lines[0], *lines[2:]]))  # reorder
    assert verify(log).bad_line == 1
    log.write_text("".join(lines) + lines[0][:20])  # a torn tail
    assert verify(log).bad_line == 8
    log.write_text("".join(lines))
    assert run_audit_verify(SimpleNamespace(path=str(log))) == 0


def test_audit_log_continues_chain_across_restarts(tmp_path):
    p = tmp_path / "a.jsonl"
    a = AuditLog(p)
    a.write({"n": 1})
    a.close()
    b = AuditLog(p)
    b.write({"n": 2, "body": "x" * 300_000})  # longer than one read-back window
    b.close()
    c = AuditLog(p)
    c.write({"n": 3})
    c.close()
    assert verify(p).ok and verify(p).lines == 3


def test_key_file_errors(tmp_path):
    bad = tmp_path / "k"
    bad.write_text("alice:not-a-hash\n")
    with pytest.raises(KeyFileError, match="line 1"):
        APIKeys.build(key_file=bad)
    with pytest.raises(KeyFileError, match="does not exist"):
        APIKeys.build(key_file=tmp_path / "missing")
    keys = APIKeys.build(["k"])
    assert keys.check("Bearer k") and keys.check("Basic k") is None and keys.check(None) is None


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_p, key_p = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_p.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_p.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    return str(cert_p), str(key_p)


def test_tls_serves_https_and_refuses_plain_http(model_dir, tmp_path):
    cert, key = _self_signed(tmp_path)
    with serve(model_dir, ssl=(cert, key)) as srv:
        assert srv.url.startswith("https://")
        ctx = ssl.create_default_context(cafile=cert)
        sdk = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, http_client=httpx.Client(verify=ctx))
        r = sdk.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.choices[0].message.content is not None
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{srv.port}/health", timeout=5)
        with pytest.raises(httpx.ConnectError):  # an unknown certificate is refused by a verifying client
            httpx.get(srv.url + "/health", timeout=5)


def test_rate_limit_429_with_retry_after(model_dir):
    cfg = ServeConfig(served_model_name="tiny", rate_limiter=RateLimiter(RateLimit.parse("2")))
    with serve(model_dir, cfg) as srv:
        sdk = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        for _ in range(2):
            sdk.completions.create(model="tiny", prompt="a", max_tokens=1)
        with pytest.raises(openai.RateLimitError) as e:
            sdk.completions.create(model="tiny", prompt="a", max_tokens=1)
        assert int(e.value.response.headers["retry-after"]) >= 1
        with client(srv) as c:
            assert c.get("/health").status_code == 200  # only /v1 POSTs are metered


def test_token_bucket_arithmetic():
    now = [0.0]
    rl = RateLimiter(RateLimit.parse("60,100"), clock=lambda: now[0])
    assert rl.admit("k") is None
    rl.charge("k", 250)  # 150 tokens in debt at 100/min -> 90 s to recover
    assert rl.admit("k") == 90
    assert rl.admit("other") is None  # buckets are per key
    now[0] = 91.0
    assert rl.admit("k") is None
    with pytest.raises(RateLimitSpecError):
        RateLimit.parse("fast")


def test_body_limit_and_queue_bound(model_dir):
    cfg = ServeConfig(served_model_name="tiny", max_body_bytes=2000, max_queue=1)
    with serve(model_dir, cfg) as srv, client(srv) as c:
        r = c.post("/v1/completions", json={"prompt": "x" * 5000})
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
        long = {"prompt": "x", "max_tokens": 200, "stream": True, "ignore_eos": True}
        step = srv.engine.step
        srv.engine.step = lambda: (time.sleep(0.02), step())[1]  # keep the first request in flight
        with c.stream("POST", "/v1/completions", json=long) as first:
            lines = first.iter_lines()  # keep the iterator: dropping it closes the stream (a disconnect)
            next(lines)
            second = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
            assert second.status_code == 503 and second.headers["retry-after"] == "1"


def test_health_503_while_loading(model_dir):
    gate = threading.Event()
    real = tiny_loader(model_dir)

    def slow():
        gate.wait(30)
        return real()

    with serve(model_dir, wait_ready=False, loader=slow) as srv, client(srv) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        assert c.post("/v1/completions", json={"prompt": "x"}).status_code == 503
        gate.set()
        deadline = time.monotonic() + 30
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200
