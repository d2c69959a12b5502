"""AsyncLLMEngine: an asyncio front for the server — many concurrent streams over one engine loop.

The engine steps in a worker thread (the model releases the GIL in its kernels); each request gets
an asyncio queue of cumulative outputs. Cancelling a consumer (e.g. a client disconnect) aborts
the request and frees its cache blocks.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, AsyncIterator

from dsv3.engine.llm_engine import LLMEngine
from dsv3.generate import RequestOutput
from dsv3.sampling import SamplingParams


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._lock = threading.Lock()  # guards engine mutations between the loop thread and callers
        self._wake = threading.Event()
        self._stop = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.errored: BaseException | None = None

    def start(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="dsv3-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop:
            with self._lock:
                busy = self.engine.has_unfinished_requests()
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                with self._lock:
                    outputs = self.engine.step()
            except BaseException as e:  # the engine is unusable: fail every stream, report unhealthy
                self.errored = e
                for q in list(self._queues.values()):
                    self._loop.call_soon_threadsafe(q.put_nowait, e)
                return
            for out in outputs:
                q = self._queues.get(out.request_id)
                if q is not None:
                    self._loop.call_soon_threadsafe(q.put_nowait, out)

    async def generate(self, prompt: str | list[int] | dict[str, Any], params: SamplingParams, request_id: str,
                       **kwargs: Any) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs for one request until it finishes; validation errors raise before any yield."""
        self.start()
        if self.errored is not None:
            raise RuntimeError("the engine has stopped after an error")
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self.engine.add_request(request_id, prompt, params, **kwargs)
            self._queues[request_id] = q
        self._wake.set()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise RuntimeError("the engine failed while generating") from item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.engine.abort(request_id)
