"""AsyncLLMEngine: an asyncio front for the server — many concurrent streams over one engine loop.

The engine steps in a worker thread (the model releases the GIL in its kernels); each request gets
an asyncio queue of cumulative outputs. New requests and aborts are validated on the caller's
side and handed to the engine thread through a queue, so accepting a request never waits for a
running step. Cancelling a consumer (e.g. a client disconnect) aborts the request and frees its
cache blocks.

A request the engine stopped after an internal error (see `LLMEngine`'s fault isolation) raises
`RequestFailedError` in its own consumer only. A step that raises outside that isolation fails the
requests in flight, frees their blocks and the loop goes on; only `EngineDeadError`, or
`MAX_STEP_FAILURES` such steps in a row, stops the loop (`errored`, and `/health` answers 503).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any, AsyncIterator

from dsv3.engine.llm_engine import EngineDeadError, LLMEngine, RequestFailedError
from dsv3.engine.outputs import EngineRequest, PromptType, RequestOutput
from dsv3.engine.sampling import SamplingParams

log = logging.getLogger("dsv3.engine")

MAX_STEP_FAILURES = 3


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", args) / ("abort", id) for the engine thread
        self._wake = threading.Event()
        self._stop = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.errored: BaseException | None = None
        self.step_failures = 0  # consecutive steps that raised outside the engine's per-request isolation

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

    def _drain_inbox(self) -> None:
        while True:
            try:
                op, arg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                request_id, request, kwargs = arg
                try:
                    self.engine.add_request(request_id, request, **kwargs)
                except Exception as e:  # validated already; a late failure still reaches its stream
                    q = self._queues.get(request_id)
                    if q is not None:
                        self._loop.call_soon_threadsafe(q.put_nowait, e)
            else:
                self.engine.abort(arg)

    def _run(self) -> None:
        while not self._stop:
            self._drain_inbox()
            if not self.engine.has_unfinished_requests():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:
                self.step_failures += 1
                dead = isinstance(e, EngineDeadError) or self.step_failures >= MAX_STEP_FAILURES
                log.error("an engine step failed (%s: %s); %s", type(e).__name__, e,
                          "the engine stops" if dead else "the requests in flight are stopped", exc_info=e)
                if dead:  # the engine is unusable: fail every stream, report unhealthy
                    self.errored = e
                for rid, q in list(self._queues.items()):
                    self.engine.abort(rid)
                    self._loop.call_soon_threadsafe(q.put_nowait, e)
                if dead:
                    return
                continue
            self.step_failures = 0
            for out in outputs:
                q = self._queues.get(out.request_id)
                if q is not None:
                    self._loop.call_soon_threadsafe(q.put_nowait, out)

    async def generate(self, prompt: PromptType | EngineRequest, params: SamplingParams | None, request_id: str,
                       **kwargs: Any) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs for one request until it finishes; validation errors raise before any yield.

        `prompt` may be an `EngineRequest` from `engine.validate` (then `params` is None): it is queued
        without being checked again.
        """
        self.start()
        if self.errored is not None:
            raise RuntimeError("the engine has stopped after an error")
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = self.engine.checked(prompt, params)  # raises before anything is queued
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        self._inbox.put(("add", (request_id, request, kwargs)))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, ValueError):
                    raise item
                if isinstance(item, BaseException):
                    raise RuntimeError("the engine failed while generating") from item
                if item.error is not None:
                    finished = True
                    raise RequestFailedError(item.error, item.error_is_input)
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()
