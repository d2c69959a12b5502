"""The hot-answer response cache: identical bodies, LRU + TTL, the SQLite tier across restarts, metrics."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dsv3.serve import ServeConfig
from dsv3.serve.cache import ResponseCache, cache_key, is_deterministic
from serve_harness import client, serve, tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


def test_which_requests_are_cacheable():
    assert is_deterministic({"temperature": 0}) and is_deterministic({"seed": 3, "temperature": 0.9})
    assert not is_deterministic({}) and not is_deterministic({"temperature": 0, "stream": True})
    assert cache_key("chat", "m", {"a": 1, "b": 2}) == cache_key("chat", "m", {"b": 2, "a": 1})
    assert cache_key("chat", "m", {"a": 1}) != cache_key("completions", "m", {"a": 1})
    assert cache_key("chat", "m", {"a": 1, "user": "x"}) == cache_key("chat", "m", {"a": 1})


def test_lru_ttl_and_disk_tier(tmp_path, monkeypatch):
    db = tmp_path / "c.sqlite"
    c = ResponseCache(db, max_entries=2, ttl_s=100)
    for k in "abc":
        c.put(k, k.encode())
    assert list(c._mem) == ["b", "c"]  # "a" was evicted from memory ...
    assert c.get("a") == b"a" and c.hits_by_tier == {"memory": 0, "disk": 1}  # ... but the disk tier has it
    assert c.get("a") == b"a" and c.hits_by_tier["memory"] == 1  # promoted
    assert c.get("zzz") is None and c.hit_rate == pytest.approx(2 / 3)
    now = time.time()
    monkeypatch.setattr("dsv3.serve.cache.time.time", lambda: now + 101)
    assert c.get("b") is None  # expired in both tiers
    c.close()
    monkeypatch.undo()
    again = ResponseCache(db, ttl_s=100)
    assert again.get("c") == b"c" and again.get("b") is None


def test_server_cache_hits_survive_restart(model_dir, tmp_path):
    db = tmp_path / "answers.sqlite"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "cache me"}], "max_tokens": 8, "temperature": 0}
    with serve(model_dir, ServeConfig(served_model_name="tiny", cache=ResponseCache(db))) as srv, client(srv) as c:
        first = c.post("/v1/chat/completions", json=body)
        assert first.headers["x-dsv3-cache"] == "miss"
        generated = srv.engine.stats["generation_tokens"]
        second = c.post("/v1/chat/completions", json=body)
        assert second.headers["x-dsv3-cache"] == "hit" and second.content == first.content
        assert srv.engine.stats["generation_tokens"] == generated  # the engine did no work
        bypass = c.post("/v1/chat/completions", json=body, headers={"x-dsv3-cache": "bypass"})
        assert "x-dsv3-cache" not in bypass.headers and srv.engine.stats["generation_tokens"] > generated
        assert bypass.json()["choices"] == first.json()["choices"]  # same greedy answer, new id
        sampled = c.post("/v1/chat/completions", json={**body, "temperature": 1.0})
        assert "x-dsv3-cache" not in sampled.headers  # not deterministic: never cached
        fams = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
        assert fams["dsv3:response_cache_hits"].samples[0].value == 1
        assert fams["dsv3:response_cache_queries"].samples[0].value == 2
        assert fams["dsv3:response_cache_hit_rate"].samples[0].value == pytest.approx(0.5)
        assert "dsv3:prefix_cache_hits" in fams
    with serve(model_dir, ServeConfig(served_model_name="tiny", cache=ResponseCache(db))) as srv, client(srv) as c:
        third = c.post("/v1/chat/completions", json=body)
        assert third.headers["x-dsv3-cache"] == "hit" and third.content == first.content
        assert srv.engine.stats["generation_tokens"] == 0
