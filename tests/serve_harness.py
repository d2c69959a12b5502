"""Start a real dsv3 server (uvicorn, in a thread) on 127.0.0.1 with a tiny random model, for tests."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from dsv3.io.load import load_model
from dsv3.engine import EngineConfig, LLMEngine
from dsv3.serve import ServeConfig, create_app
from dsv3.io.tokenizer import Tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_loader(model_dir: Path, max_model_len: int = 256, **engine_kw):
    def load():
        model = load_model(model_dir, dtype="fp32")
        tok = Tokenizer.from_dir(model_dir)
        cfg = EngineConfig(max_num_seqs=engine_kw.pop("max_num_seqs", 16), max_model_len=max_model_len,
                           kv_cache_memory=16 << 20, **engine_kw)
        return LLMEngine(model, tok, cfg), tok
    return load


class RunningServer:
    def __init__(self, app, port: int, scheme: str):
        self.app, self.port, self.scheme = app, port, scheme
        self.url = f"{scheme}://127.0.0.1:{port}"
        self.state = app.state

    @property
    def engine(self):
        return self.state.engine


@contextmanager
def serve(model_dir: Path, config: ServeConfig | None = None, ssl: tuple[str, str] | None = None,
          wait_ready: bool = True, loader=None, **engine_kw):
    config = config or ServeConfig(served_model_name="tiny")
    app = create_app(config, loader or tiny_loader(model_dir, **engine_kw))
    port = free_port()
    ucfg = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                          ssl_certfile=ssl[0] if ssl else None, ssl_keyfile=ssl[1] if ssl else None,
                          timeout_graceful_shutdown=5, proxy_headers=False)
    server = uvicorn.Server(ucfg)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    running = RunningServer(app, port, "https" if ssl else "http")
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    if wait_ready:
        while not app.state.ready:
            if app.state.load_error is not None:
                raise app.state.load_error
            if time.monotonic() > deadline:
                raise RuntimeError("the test model did not load")
            time.sleep(0.05)
    try:
        yield running
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def client(srv: RunningServer, **kw) -> httpx.Client:
    return httpx.Client(base_url=srv.url, timeout=60, **kw)


def tiny_model_dir(tmp_path_factory) -> Path:
    """One tiny random model directory per test module."""
    from tiny_model import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))


def oracle(model_dir: Path, max_model_len: int = 256):
    """The single-request `Generator` (dense cache, no batching): an independent path to compare against."""
    from reference_decoder import Generator

    tok = Tokenizer.from_dir(model_dir)
    return Generator(load_model(model_dir, dtype="fp32"), tok, max_model_len), tok


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def srv(model_dir):
    with serve(model_dir) as s:
        yield s


@pytest.fixture(scope="module")
def ref(model_dir):
    return oracle(model_dir)
