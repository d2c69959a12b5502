"""Server-sent events the way OpenAI clients parse them.

Each event is `data: <json>\\n\\n`; the stream ends with `data: [DONE]`. While the engine is busy
with other requests a comment line (`: keep-alive`) is sent every few seconds so proxies do not
time the connection out. An error after the response has started cannot change the status code,
so it is sent as `data: {"error": {...}}` before `[DONE]`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

from dsv3.serve.errors import APIError, error_body

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"


LARGE_BODY_ITEMS = 20_000  # tokens (or logprob entries) past which a JSON body is encoded off the event loop


async def json_body(obj: Any, items: int = 0) -> bytes:
    """A response body as JSON bytes. json's C encoder holds the GIL for the whole document (about a second for a
    million token ids), so a large body (`items` past LARGE_BODY_ITEMS) is encoded in a worker thread by the
    pure-Python incremental encoder, which lets the event loop run between its pieces."""
    if items <= LARGE_BODY_ITEMS:
        return json.dumps(obj, ensure_ascii=False).encode()
    return await asyncio.to_thread(lambda: "".join(json.JSONEncoder(ensure_ascii=False).iterencode(obj)).encode())


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def with_keepalive(it: AsyncIterator[Any], every_s: float) -> AsyncIterator[Any]:
    """Yield items of `it`, and None whenever `every_s` passes without one (the caller sends a comment)."""
    nxt: asyncio.Task | None = None
    try:
        while True:
            if nxt is None:
                nxt = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({nxt}, timeout=every_s)
            if not done:
                yield None
                continue
            try:
                item = nxt.result()
            except StopAsyncIteration:
                return
            finally:
                nxt = None
            yield item
    finally:
        if nxt is not None:
            nxt.cancel()
            try:
                await nxt
            except BaseException:
                pass
        await it.aclose()


async def merge(iters: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several async iterators as (index, item), finishing when all are exhausted."""
    if len(iters) == 1:
        async for item in iters[0]:
            yield 0, item
        return
    q: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, it: AsyncIterator[Any]) -> None:
        try:
            async for item in it:
                await q.put((i, item))
        except Exception as e:
            await q.put((i, e))
            return
        await q.put((i, end))

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(iters)]
    try:
        left = len(tasks)
        while left:
            i, item = await q.get()
            if item is end:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def error_event(e: BaseException) -> bytes:
    if isinstance(e, APIError):
        return sse(error_body(e.status, e.message, e.param, e.code))
    return sse(error_body(500, "internal server error during streaming; see the server log"))
