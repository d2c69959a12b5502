"""SSE behaviour under trouble: keep-alive comments while waiting, and an engine failure mid-stream."""

from __future__ import annotations

import json
import time

import pytest

from dsv3.serve import ServeConfig
from serve_harness import client, serve, tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


def test_keepalive_then_error_event_and_engine_carries_on(model_dir):
    """A step that fails outside per-request isolation ends the streams in flight with an in-band error; the
    engine carries on (/health 200, the next request succeeds) -- only an EngineDeadError stops it."""
    from dsv3.engine import EngineDeadError

    with serve(model_dir, ServeConfig(served_model_name="tiny", keepalive_s=0.05)) as srv, client(srv) as c:
        eng, step, calls = srv.engine, srv.engine.step, {"n": 0, "fault": RuntimeError("simulated device fault")}

        def flaky():
            calls["n"] += 1
            time.sleep(0.1)  # slower than the keep-alive period
            if calls["n"] == 4:
                raise calls["fault"]
            return step()

        eng.step = flaky
        raw = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 50, "stream": True}).text
        events = [e for e in raw.split("\n\n") if e]
        assert ": keep-alive" in events
        data = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
        assert "choices" in data[0] and set(data[-1]) == {"error"}
        assert data[-1]["error"]["code"] == 503 and events[-1] == "data: [DONE]"
        assert c.get("/health").status_code == 200
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3}).status_code == 200

        calls["n"], calls["fault"] = 0, EngineDeadError("a parallel rank stopped")
        raw = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 50, "stream": True}).text
        assert '"error"' in raw and raw.endswith("data: [DONE]\n\n")
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        r = c.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and "engine" in r.json()["error"]["message"]
