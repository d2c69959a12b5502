"""No request can take `dsv3 serve` down, stall it, or cross tenants.

One test (or more) per class of defect found on the server: requests that killed the engine,
injected faults in the model step / sampling / grammar, schemas that stalled the event loop, lone
surrogates, the audit log's crash promise and key, unauthenticated disk filling, the response
cache across tenants and weights, and limits that leaked (TPM on disconnect, queue overflow for
streams, oversized batches, spoofed X-Forwarded-For).
"""

from __future__ import annotations

import hashlib
import ipaddress
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

import dsv3.engine.llm_engine as engine_mod
from dsv3.serve import ServeConfig
from dsv3.serve.audit import AuditLog, seal, verify
from dsv3.serve.auth import APIKeys
from dsv3.serve.cache import ResponseCache, weights_fingerprint
from dsv3.serve.ratelimit import RateLimit, RateLimiter
from dsv3.serve.structured import GrammarLimits, GrammarProcessor, max_repetition
from serve_harness import client, serve, tiny_model_dir
from tiny_model import make_tiny_model_dir

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}
MARK = [17, 19, 23, 29]  # the first prompt tokens of a poisoned request


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def srv(model_dir):
    with serve(model_dir, max_model_len=512) as s:
        yield s


def chat(c, **kw):
    return c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **kw})


def healthy(c) -> bool:
    return c.get("/health").status_code == 200 and \
        c.post("/v1/completions", json={"prompt": "def f", "max_tokens": 4, "temperature": 0}).status_code == 200


def error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


# ---- 1. requests that killed the engine ------------------------------------------------------------

def test_requests_that_killed_the_engine_are_refused_up_front(srv, model_dir):
    vocab = srv.engine.model.config.vocab_size
    json_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    tool = {"type": "function", "function": {"name": "f", "parameters": SCHEMA}}
    with client(srv) as c:
        assert error(chat(c, response_format=json_schema, ignore_eos=True), 400)["param"] == "ignore_eos"
        assert healthy(c)
        assert error(chat(c, response_format=json_schema, min_tokens=5), 400)["param"] == "min_tokens"
        assert error(chat(c, response_format={"type": "json_object"}, ignore_eos=True), 400)["param"] == "ignore_eos"
        assert error(chat(c, tools=[tool], tool_choice="required", ignore_eos=True), 400)["param"] == "ignore_eos"
        r = c.post("/v1/completions", json={"prompt": "x", "min_tokens": 3, "max_tokens": 5, "stop_token_ids": [vocab + 5]})
        assert error(r, 400)["param"] == "stop_token_ids"
        assert healthy(c)
        # top_k past the vocabulary means "no top-k" (as in vLLM): served, identical to top_k 0
        body = {"prompt": "def f", "max_tokens": 6, "temperature": 0.9, "seed": 7}
        big = c.post("/v1/completions", json={**body, "top_k": 2 ** 64})
        assert big.status_code == 200
        assert big.json()["choices"][0]["text"] == c.post("/v1/completions", json={**body, "top_k": 0}).json()["choices"][0]["text"]
        assert healthy(c)


# ---- 1b. injected faults: the engine isolates them per request -------------------------------------

def _poisoned(engine):
    return [s for r in list(engine.requests.values()) if r.prompt_ids[:len(MARK)] == MARK for s in r.seqs]


def _stream_text(c, body, out: dict, key):
    text, events = "", []
    with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        out[key + "_status"] = r.status_code
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ev = json.loads(line[6:])
                events.append(ev)
                text += "".join(ch.get("text", "") for ch in ev.get("choices", []))
    out[key] = (text, events)


@pytest.mark.parametrize("where", ["forward", "sampling", "grammar"])
def test_injected_fault_fails_one_request_and_the_server_keeps_serving(model_dir, where, monkeypatch):
    normal = [{"prompt": p, "max_tokens": 40, "temperature": 0, "ignore_eos": True} for p in ("def f(", "class A", "import os")]
    with serve(model_dir, max_model_len=256) as s, client(s) as c:
        clean = [c.post("/v1/completions", json=b).json()["choices"][0]["text"] for b in normal]
        eng = s.engine
        if where == "forward":
            real = eng.runner.execute

            def execute(items):
                bad = _poisoned(eng)
                if any(it.block_table is q.block_table for q in bad for it in items) and \
                        any(q.num_output_tokens >= 3 for q in bad):
                    raise RuntimeError("injected forward fault")
                return real(items)
            eng.runner.execute = execute
        elif where == "sampling":
            real_sample = engine_mod.sample

            def sample(logits, params, gens):
                if any(p is q.params for q in _poisoned(eng) for p in params):
                    raise OverflowError("injected sampling fault")
                return real_sample(logits, params, gens)
            monkeypatch.setattr(engine_mod, "sample", sample)
        else:
            real_call = GrammarProcessor.__call__

            def call(self, out_ids, logits):
                if len(out_ids) == 2:
                    raise RuntimeError("injected grammar fault")
                return real_call(self, out_ids, logits)
            monkeypatch.setattr(GrammarProcessor, "__call__", call)

        step = eng.step

        def slow_step():  # slow enough that all requests overlap
            time.sleep(0.005)
            return step()
        eng.step = slow_step
        poison = {"prompt": MARK + [5, 6, 7], "max_tokens": 30, "temperature": 0}
        if where == "grammar":
            poison["response_format"] = {"type": "json_object"}
        results: dict = {}
        threads = [threading.Thread(target=_stream_text, args=(httpx.Client(base_url=s.url, timeout=60), b, results, f"n{i}"))
                   for i, b in enumerate(normal)]
        threads.append(threading.Thread(target=_stream_text, args=(httpx.Client(base_url=s.url, timeout=60), poison,
                                                                   results, "poison_stream")))
        for t in threads:
            t.start()
        r = c.post("/v1/completions", json=poison)  # the same request, not streamed, at the same time
        health_during = c.get("/health").status_code
        for t in threads:
            t.join(60)
        err = error(r, 422)
        assert err["code"] == "generation_failed" and "injected" in err["message"]
        text, events = results["poison_stream"]
        assert results["poison_stream_status"] == 200 and events[-1]["error"]["code"] == "generation_failed"
        assert [results[f"n{i}"][0] for i in range(3)] == clean  # the others, exactly as without the fault
        assert health_during == 200 and healthy(c)
        metrics = c.get("/metrics").text
        assert "dsv3:request_errors_total 2.0" in metrics
        assert 'dsv3:request_success_total{finished_reason="error"} 2.0' in metrics
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks or eng.config.enable_prefix_caching
        assert not eng.requests


# ---- 2. schema compilation --------------------------------------------------------------------------

def _rf(schema):
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def _nested(depth):
    d = {"type": "string"}
    for _ in range(depth):
        d = {"type": "object", "properties": {"x": d}, "required": ["x"]}
    return d


def test_repetition_count_of_regexes():
    assert max_repetition("^a{1,30000}$") == 30000
    assert max_repetition("((a{1,20}){1,20}){1,5}") == 2000
    assert max_repetition(r"^\d{3}-\d{4}$") == 4 and max_repetition(r"\{1,99999\}") == 1 and max_repetition("[{]{2,3}") == 3


def test_costly_schemas_are_refused_by_their_limit_at_once(srv):
    cases = [
        ({"type": "object", "properties": {"a": {"type": "string", "pattern": "^a{1,30000}$"}}}, "--grammar-max-repeat"),
        (_nested(450), "--grammar-max-depth"),  # 900 levels of JSON
        ({"enum": [f"v{i}" for i in range(20000)]}, "--grammar-max-enum"),
        ({"type": "object", "description": "x" * 70000}, "--grammar-max-bytes"),
    ]
    with client(srv) as c:
        for schema, flag in cases:
            t = time.monotonic()
            err = error(chat(c, response_format=_rf(schema)), 400)
            assert flag in err["message"] and time.monotonic() - t < 2.0, err
            tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
            assert flag in error(chat(c, tools=[tool], tool_choice="required"), 400)["message"]
        r = c.post("/v1/completions", json={"prompt": "x", "response_format": _rf(cases[0][0])})
        assert "--grammar-max-repeat" in error(r, 400)["message"]
        assert healthy(c)


def test_a_compile_never_stalls_health_or_streams_and_stops_at_its_budget(model_dir):
    """Limits relaxed so a costly schema reaches the compiler: /health and a running stream keep their pace
    while it compiles, the compile is stopped at the budget (400), and the next schema compiles fine."""
    limits = GrammarLimits(max_depth=100_000, max_repeat=10 ** 9, timeout_s=1.5)
    cfg = ServeConfig(served_model_name="tiny", grammar_limits=limits, keepalive_s=0.2)
    with serve(model_dir, cfg, max_model_len=1024) as s, client(s) as c:
        assert chat(c, response_format=_rf(SCHEMA), max_tokens=20).status_code == 200  # the compiler is up
        step = s.engine.step

        def slow_step():
            time.sleep(0.01)
            return step()
        s.engine.step = slow_step
        arrivals: list[float] = []
        done = threading.Event()

        def stream():
            body = {"prompt": "def f", "max_tokens": 600, "temperature": 0, "ignore_eos": True, "stream": True}
            with httpx.Client(base_url=s.url, timeout=60) as sc, sc.stream("POST", "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line:
                        arrivals.append(time.monotonic())
            done.set()
        th = threading.Thread(target=stream)
        th.start()
        while len(arrivals) < 5:
            time.sleep(0.01)
        result: dict = {}

        def costly():
            t = time.monotonic()
            result["r"] = chat(httpx.Client(base_url=s.url, timeout=60),
                               response_format=_rf({"type": "object", "properties": {"a": {"type": "string",
                                                                                            "pattern": "^a{1,30000}$"}}}))
            result["t"] = (t, time.monotonic())
        ct = threading.Thread(target=costly)
        ct.start()
        health = []
        while ct.is_alive():
            t = time.monotonic()
            assert c.get("/health").status_code == 200
            health.append(time.monotonic() - t)
            time.sleep(0.05)
        err = error(result["r"], 400)
        assert "--grammar-timeout" in err["message"]
        t0, t1 = result["t"]
        assert 1.4 < t1 - t0 < 6.0
        assert max(health) < 0.5, max(health)
        during = [b - a for a, b in zip(arrivals, arrivals[1:]) if t0 <= a <= t1]
        assert during and max(during) < 0.5, max(during or [0])
        th.join(60)
        s.engine.step = step
        r = chat(c, response_format=_rf(SCHEMA), max_tokens=30)  # a new compiler process took over
        choice = r.json()["choices"][0]
        assert r.status_code == 200 and (choice["finish_reason"] == "length" or "a" in json.loads(choice["message"]["content"]))
        assert s.state._grammar.pool.killed == 1


def test_long_texts_never_stall_the_event_loop(srv):
    """Megabytes of prompt: refused before tokenizing when they cannot fit the context, and tokenized in a worker
    thread (with the GIL released) when they must be (/tokenize), so /health keeps its pace."""
    text = "def f(x):\n    return x + 1\n" * 110_000  # 2.9 MB
    with client(srv) as c:
        t = time.monotonic()
        err = error(chat(c, messages=[{"role": "user", "content": text}]), 400)
        assert "characters" in err["message"] and time.monotonic() - t < 2.0
        result: dict = {}

        def tokenize():
            result["r"] = httpx.post(srv.url + "/tokenize", json={"prompt": text}, timeout=120)
        th = threading.Thread(target=tokenize)
        th.start()
        lat = []
        while th.is_alive():
            t = time.monotonic()
            assert c.get("/health").status_code == 200
            lat.append(time.monotonic() - t)
            time.sleep(0.02)
        r = result["r"]
        assert r.status_code == 200 and r.json()["count"] > 100_000
        assert len(lat) > 5 and max(lat) < 0.5, (len(lat), max(lat))


# ---- 3. lone surrogates -----------------------------------------------------------------------------

def test_lone_surrogates_are_a_400(srv):
    raw = {"content-type": "application/json"}
    with client(srv) as c:
        for route, body in [
            ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}'),
            ("/v1/completions", '{"prompt": "\\udc00abc", "max_tokens": 2}'),
            ("/v1/completions", '{"prompt": ["ok", "x\\ud83d"], "max_tokens": 2}'),
            ("/v1/completions", '{"prompt": "ok", "stop": ["\\ud800"], "max_tokens": 2}'),
            ("/tokenize", '{"prompt": "\\ud800"}'),
            ("/tokenize", '{"messages": [{"role": "user", "content": "\\udfff"}]}'),
        ]:
            err = error(c.post(route, content=body, headers=raw), 400)
            assert "surrogate" in err["message"]
        ok = c.post("/v1/completions", content='{"prompt": "ok \\ud83d\\ude00", "max_tokens": 2}', headers=raw)
        assert ok.status_code == 200  # a proper surrogate pair is an emoji, and fine
        assert healthy(c)


# ---- 4. the audit log's crash promise ---------------------------------------------------------------

def test_audit_line_is_durable_before_done_reaches_the_client(model_dir, tmp_path):
    log = tmp_path / "audit.jsonl"
    audit = AuditLog(log)
    real = audit.write

    def slow_write(rec):
        time.sleep(0.3)
        real(rec)
    audit.write = slow_write
    cfg = ServeConfig(served_model_name="tiny", audit=audit)
    with serve(model_dir, cfg) as s, client(s) as c:
        for stream in (True, False):
            body = {"prompt": "def f", "max_tokens": 5, "stream": stream}
            with c.stream("POST", "/v1/completions", json=body) as r:
                rid = r.headers["x-request-id"]
                for line in r.iter_lines():
                    if line == "data: [DONE]" or (not stream and line):
                        break
                ids = [json.loads(x)["request_id"] for x in log.read_text().splitlines()]
                assert rid in ids  # the client holds the end of the answer: the line is already on disk


def test_torn_last_line_is_moved_aside_and_the_server_starts(model_dir, tmp_path, capsys):
    from dsv3.cli import main

    log = tmp_path / "audit.jsonl"
    a = AuditLog(log)
    for i in range(3):
        a.write({"n": i})
    a.close()
    torn = b'{"n": 3, "body": "' + b"x" * 5000
    with open(log, "ab") as f:
        f.write(torn)
    assert not verify(log).ok
    assert main(["audit", "repair", str(log)]) == 0
    assert "moved a torn last line (5018 bytes" in capsys.readouterr().out
    r = verify(log)
    assert r.ok and r.lines == 4
    rec = json.loads(log.read_text().splitlines()[-1])
    assert rec["event"] == "audit_repair" and rec["torn_sha256"] == hashlib.sha256(torn).hexdigest()
    assert (tmp_path / rec["moved_to"]).read_bytes() == torn
    assert main(["audit", "repair", str(log)]) == 0 and "nothing to repair" in capsys.readouterr().out

    with open(log, "ab") as f:  # torn again: the server repairs it itself at start-up (with a warning)
        f.write(b'{"half a line')
    with serve(model_dir, ServeConfig(served_model_name="tiny", audit=AuditLog(log))) as s, client(s) as c:
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    r = verify(log)
    assert r.ok and r.lines == 6
    assert main(["audit", "verify", str(log)]) == 0


_WRITER = r"""
import sys, os
from dsv3.serve.audit import AuditLog
log = AuditLog(sys.argv[1])
print("ready", flush=True)
i = 0
while True:
    log.write({"i": i, "body": "y" * (4 << 20)})
    i += 1
"""


def test_kill_9_mid_write_never_leaves_an_unusable_log(tmp_path):
    """A writer of 4 MB lines killed at random moments: reopening always yields a log that verifies."""
    log = tmp_path / "audit.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    for delay in (0.35, 0.5, 0.65):
        p = subprocess.Popen([sys.executable, "-c", _WRITER, str(log)], stdout=subprocess.PIPE, env=env)
        assert p.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        a = AuditLog(log)  # repairs a torn tail, if the kill left one
        a.write({"after": delay})
        a.close()
        assert verify(log).ok


def test_keyed_chain_rejects_forged_and_rechained_lines(model_dir, tmp_path, capsys):
    from dsv3.cli import main

    key_file = tmp_path / "audit.key"
    key_file.write_text("k" * 32)
    log = tmp_path / "audit.jsonl"
    plain = AuditLog(log)
    plain.write({"n": "before the key"})
    plain.close()
    cfg = ServeConfig(served_model_name="tiny", audit=AuditLog(log, b"k" * 32))
    with serve(model_dir, cfg) as s, client(s) as c:
        for _ in range(2):
            assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    assert main(["audit", "verify", str(log), "--key", str(key_file)]) == 0
    assert "HMAC from line 2" in capsys.readouterr().out
    assert main(["audit", "verify", str(log)]) == 1  # keyed lines need the key
    assert "keyed" in capsys.readouterr().out
    lines = log.read_bytes().splitlines(keepends=True)

    def rechain(records, key=None):
        prev, out = "0" * 64, []
        for rec in records:
            line = seal(rec, prev, key)
            out.append(line)
            prev = hashlib.sha256(line).hexdigest()
        return b"".join(out)

    recs = [json.loads(x) for x in lines]
    forged = dict(recs[1], status=500)
    for bad in (
        b"".join(lines) + seal({"forged": True}, hashlib.sha256(lines[-1]).hexdigest()),  # unkeyed append
        rechain([recs[0], forged, recs[2]]),  # edited and re-chained without the key (plain SHA-256)
        rechain([recs[0], forged, recs[2]], b"x" * 32),  # re-chained with the wrong key
    ):
        log.write_bytes(bad)
        r = verify(log, b"k" * 32)
        assert not r.ok, r
        assert main(["audit", "verify", str(log), "--key", str(key_file)]) == 1
    log.write_bytes(rechain([recs[0]]))
    assert not verify(log, b"k" * 32).ok and "no line is keyed" in verify(log, b"k" * 32).reason


# ---- 5. unauthenticated clients cannot fill the disk ------------------------------------------------

def test_refused_requests_log_one_small_line_at_a_bounded_rate(model_dir, tmp_path):
    log = tmp_path / "audit.jsonl"
    cfg = ServeConfig(served_model_name="tiny", keys=APIKeys.build(["good"]), audit=AuditLog(log), audit_content=True,
                      refusal_log_per_minute=5)
    with serve(model_dir, cfg) as s, client(s) as c:
        big = {"prompt": "x" * (1 << 20)}
        for _ in range(40):
            assert c.post("/v1/completions", json=big).status_code == 401
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers={"Authorization": "Bearer good"})
        assert r.status_code == 200
        long_id = "r" * 20000
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                   headers={"Authorization": "Bearer good", "x-request-id": long_id})
        assert r.status_code == 200 and len(r.headers["x-request-id"]) <= 128 and r.headers["x-request-id"] != long_id
        ok_id = "client-id_123"
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                   headers={"Authorization": "Bearer good", "x-request-id": ok_id})
        assert r.headers["x-request-id"] == ok_id
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    refused = [r for r in recs if r["status"] == 401]
    assert 1 <= len(refused) <= 6 and all("body" not in r for r in refused)
    assert max(len(x) for x in log.read_text().splitlines()) < 4000
    assert verify(log).ok
    accepted = [r for r in recs if r["status"] == 200]
    assert len(accepted) == 3 and all("body" in r for r in accepted)  # --audit-log-content still holds for them



def test_413_and_429_are_logged_like_401(model_dir, tmp_path):
    """Oversized bodies (413) and rate-limited requests (429) of an authenticated client: one small line each without
    the body, at the per-address rate, and the chain still verifies."""
    log = tmp_path / "audit.jsonl"
    cfg = ServeConfig(served_model_name="tiny", keys=APIKeys.build(["good"]), audit=AuditLog(log), audit_content=True,
                      refusal_log_per_minute=4, max_body_bytes=4096, rate_limiter=RateLimiter(RateLimit(3)))
    auth = {"Authorization": "Bearer good"}
    with serve(model_dir, cfg) as s, client(s) as c:
        for _ in range(3):  # the address's allowance (4 lines a minute) is shared by every kind of refusal
            assert c.post("/v1/completions", json={"prompt": "x" * 100_000}, headers=auth).status_code == 413
        codes = [c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=auth).status_code for _ in range(20)]
        assert codes.count(200) >= 1 and codes.count(429) >= 15, codes
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    lines = {status: [r for r in recs if r["status"] == status] for status in (413, 429)}
    assert len(lines[413]) == 3 and 1 <= len(lines[429]) <= 2, {k: len(v) for k, v in lines.items()}
    assert all("body" not in r for v in lines.values() for r in v)
    assert max(len(x) for x in log.read_text().splitlines()) < 4000
    assert verify(log).ok

def test_suppressed_refusals_are_counted_on_the_next_line():
    from dsv3.serve.ratelimit import RefusalLog

    now = [0.0]
    rl = RefusalLog(per_minute=2, clock=lambda: now[0])
    assert [rl.admit("a") for _ in range(4)] == [(True, 0), (True, 0), (False, 0), (False, 0)]
    assert rl.admit("b") == (True, 0)  # another address has its own allowance
    now[0] = 30.0  # one line's worth refilled
    assert rl.admit("a") == (True, 2)


# ---- 6. the response cache never crosses tenants or weights -----------------------------------------

def test_cache_keeps_tenants_apart(model_dir):
    cfg = ServeConfig(served_model_name="tiny", keys=APIKeys.build(["alice-key", "bob-key"]),
                      cache=ResponseCache(None))
    body = {"prompt": "def f", "max_tokens": 4, "temperature": 0}
    with serve(model_dir, cfg) as s, client(s) as c:
        a1 = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer alice-key"})
        b1 = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer bob-key"})
        a2 = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer alice-key"})
    assert a1.headers["x-dsv3-cache"] == "miss" and b1.headers["x-dsv3-cache"] == "miss"
    assert a1.json()["id"] != b1.json()["id"]
    assert a2.headers["x-dsv3-cache"] == "hit" and a2.json()["id"] == a1.json()["id"]


def test_disk_cache_of_other_weights_is_ignored(model_dir, tmp_path, caplog):
    other = make_tiny_model_dir(tmp_path / "other", seed=1)
    db = tmp_path / "cache.sqlite"
    body = {"prompt": "def f", "max_tokens": 4, "temperature": 0}

    def ask(d):
        with serve(d, ServeConfig(served_model_name="tiny", cache=ResponseCache(db))) as s, client(s) as c:
            return c.post("/v1/completions", json=body)

    first = ask(model_dir)
    assert first.headers["x-dsv3-cache"] == "miss"
    assert ask(model_dir).headers["x-dsv3-cache"] == "hit"  # same weights after a restart: served from disk
    with caplog.at_level("WARNING", logger="dsv3.serve"):
        swapped = ask(other)  # same served name, other weights
    assert swapped.headers["x-dsv3-cache"] == "miss" and swapped.json()["id"] != first.json()["id"]
    assert any("other weights" in r.message for r in caplog.records)


def test_weights_fingerprint_follows_weights_adapters_and_quantization(model_dir):
    import torch

    from dsv3.io.load import load_model
    from dsv3.quant.apply import quantize_model

    m = load_model(model_dir, dtype="fp32", progress=False)
    base = weights_fingerprint(m)
    assert weights_fingerprint(load_model(model_dir, dtype="fp32", progress=False)) == base
    assert weights_fingerprint(m, ["sql"]) != base
    with torch.no_grad():
        p = m.model.layers[1].self_attn.o_proj.weight
        p.view(-1)[-1] += 1.0  # one element, the last one: sampled
    assert weights_fingerprint(m) != base
    q = load_model(model_dir, dtype="fp32", progress=False)
    quantize_model(q, "int8", progress=False)
    assert weights_fingerprint(q) != base



def test_other_adapter_files_behind_the_same_lora_name_change_the_fingerprint(model_dir, tmp_path):
    """A restart that serves other adapter files under the same `--lora sql=DIR` name must not reuse the cache."""
    import torch

    from dsv3.io.load import load_model
    from dsv3.lora import LoRASpec, inject_lora, save_adapter
    from dsv3.lora.multi import load_stacked

    def adapter(seed: int) -> Path:
        m = load_model(model_dir, dtype="fp32", progress=False)
        spec = LoRASpec(r=4, target_modules=["q_b_proj", "o_proj"])
        inject_lora(m, spec)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)  # a trained adapter: B is not zero
        return save_adapter(m, tmp_path / f"sql{seed}", spec)

    prints = []
    for d in (adapter(1), adapter(2), adapter(1)):
        m = load_model(model_dir, dtype="fp32", progress=False)
        load_stacked(m, [d])
        prints.append(weights_fingerprint(m, ["sql"]))
    assert prints[0] != prints[1] and prints[0] == prints[2]

# ---- 7. limits that leaked --------------------------------------------------------------------------

def test_tokens_of_a_dropped_stream_are_charged(model_dir):
    limiter = RateLimiter(RateLimit(1000, 100_000))
    charged, real_charge = [], limiter.charge

    def charge(key, tokens):
        charged.append((key, tokens))
        real_charge(key, tokens)
    limiter.charge = charge
    with serve(model_dir, ServeConfig(served_model_name="tiny", rate_limiter=limiter), max_model_len=512) as s:
        step = s.engine.step

        def slow():
            time.sleep(0.01)
            return step()
        s.engine.step = slow
        body = {"prompt": "def f", "max_tokens": 300, "temperature": 0, "ignore_eos": True, "stream": True}
        got = 0
        with httpx.Client(base_url=s.url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                got += line.startswith("data: {")
                if got >= 30:
                    break  # drop the connection mid-stream
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not charged:
            time.sleep(0.05)
        assert len(charged) == 1 and charged[0][0] == "127.0.0.1"
        assert charged[0][1] >= 30, charged  # the prompt's tokens and at least the 29 sent


def test_queue_overflow_is_a_503_before_a_stream_starts(model_dir):
    cfg = ServeConfig(served_model_name="tiny", max_queue=2)
    with serve(model_dir, cfg, max_model_len=512) as s, client(s) as c:
        step = s.engine.step
        gate = threading.Event()

        def held():
            gate.wait(10)
            return step()
        s.engine.step = held
        long = {"prompt": "x", "max_tokens": 50, "stream": True}
        opened = []
        for _ in range(2):
            cl = httpx.Client(base_url=s.url, timeout=60)
            req = cl.build_request("POST", "/v1/completions", json=long)
            opened.append((cl, cl.send(req, stream=True)))
        assert all(r.status_code == 200 for _, r in opened)
        over = c.post("/v1/completions", json=long)
        assert error(over, 503)["code"] == "server_overloaded" and over.headers["retry-after"] == "1"
        over_chat = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "stream": True})
        assert over_chat.status_code == 503
        batch = c.post("/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 2})
        assert error(batch, 400)["param"] == "prompt"  # a batch larger than the whole queue can never run
        gate.set()
        for cl, r in opened:
            r.read()
            r.close()
            cl.close()
        assert c.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2}).status_code == 200
        deadline = time.monotonic() + 5  # slots are given back just after a response's last byte
        while s.state.inflight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.state.inflight == 0


def test_forwarded_for_is_read_only_from_trusted_proxies(model_dir, tmp_path):
    for trusted, expect in ((None, "127.0.0.1"), ("127.0.0.0/8", "203.0.113.9")):
        log = tmp_path / f"audit-{expect}.jsonl"
        cfg = ServeConfig(served_model_name="tiny", audit=AuditLog(log), rate_limiter=RateLimiter(RateLimit(1000)),
                          trusted_proxies=[ipaddress.ip_network(trusted)] if trusted else [])
        with serve(model_dir, cfg) as s, client(s) as c:
            r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                       headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.9"})
            assert r.status_code == 200
            assert set(cfg.rate_limiter._req) == {expect}
        rec = json.loads(log.read_text().splitlines()[-1])
        assert rec["client"].split(":")[0] == expect


def test_client_address_walks_trusted_hops_from_the_right():
    from dsv3.serve.gate import client_address

    nets = [ipaddress.ip_network("10.0.0.0/8")]
    assert client_address("10.0.0.2", ["1.2.3.4, 10.0.0.7"], nets) == "1.2.3.4"
    assert client_address("10.0.0.2", ["6.6.6.6, 1.2.3.4"], nets) == "1.2.3.4"  # a spoofed left entry is not reached
    assert client_address("8.8.8.8", ["1.2.3.4"], nets) == "8.8.8.8"  # an untrusted peer's header is ignored
    assert client_address("10.0.0.2", ["garbage"], nets) == "10.0.0.2"
    assert client_address("10.0.0.2", ["1.2.3.4"], []) == "10.0.0.2"
