"""The ASGI gate every HTTP request passes: body limit, API key, rate limit, audit line, request count.

It reads the body once (refusing more than `max_body_bytes` with 413) so it can hash it for the
audit log, then replays it to the app. The audit line is written -- fsynced -- before the last
byte of the response is sent, so no client ever holds an answer the log does not know about.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from dsv3.serve.errors import error_bytes
from dsv3.serve.state import ServerState

log = logging.getLogger("dsv3.serve.access")

PUBLIC = ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")


class Gate:
    def __init__(self, app: Any, state: ServerState):
        self.app, self.state = app, state

    def _needs_key(self, path: str) -> bool:
        if not self.state.config.keys.enabled or path in PUBLIC:
            return False
        if path in ("/health", "/metrics"):
            return self.state.config.protect_health_metrics
        return True

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cfg, t0 = self.state.config, time.monotonic()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        rid = headers.get("x-request-id") or uuid.uuid4().hex
        info: dict[str, Any] = {"request_id": rid, "key_id": None, "model": None, "prompt_tokens": 0,
                                "completion_tokens": 0, "cache": None}
        scope["dsv3"] = info
        sent: dict[str, Any] = {"status": None, "logged": False}
        body_hash = hashlib.sha256()
        body = b""

        async def finish(status: int) -> None:
            if sent["logged"]:
                return
            sent["logged"] = True
            await self._record(scope, info, status, t0, body_hash.hexdigest(), body)

        async def send_wrapped(message: dict) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                await finish(sent["status"] or 500)
            await send(message)

        async def refuse(status: int, msg: str, extra: list | None = None) -> None:
            payload = error_bytes(status, msg)
            await send_wrapped({"type": "http.response.start", "status": status,
                                "headers": [(b"content-type", b"application/json"), *(extra or [])]})
            await send_wrapped({"type": "http.response.body", "body": payload})

        try:
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes:
                return await refuse(413, f"the request body is larger than the {cfg.max_body_bytes}-byte limit")
            chunks, size, more = [], 0, True
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return await finish(499)
                chunk = msg.get("body", b"")
                size += len(chunk)
                if size > cfg.max_body_bytes:
                    return await refuse(413, f"the request body is larger than the {cfg.max_body_bytes}-byte limit")
                chunks.append(chunk)
                body_hash.update(chunk)
                more = msg.get("more_body", False)
            body = b"".join(chunks)

            if self._needs_key(scope["path"]):
                kid = cfg.keys.check(headers.get("authorization"))
                if kid is None:
                    return await refuse(401, "a valid API key is required (Authorization: Bearer KEY)",
                                        [(b"www-authenticate", b"Bearer")])
                info["key_id"] = kid
            if cfg.rate_limiter is not None and scope["method"] == "POST" and scope["path"].startswith("/v1/"):
                who = info["key_id"] or (scope.get("client") or ("?",))[0]
                wait = cfg.rate_limiter.admit(who)
                if wait is not None:
                    return await refuse(429, f"rate limit exceeded for {who}; retry in {wait} s",
                                        [(b"retry-after", str(wait).encode())])

            replayed = False

            async def replay() -> dict:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_wrapped)
        finally:
            if not sent["logged"]:  # the client went away mid-response, or the app raised
                await finish(sent["status"] or 499)

    async def _record(self, scope: dict, info: dict, status: int, t0: float, digest: str, body: bytes) -> None:
        cfg = self.state.config
        client = scope.get("client") or ("", 0)
        rec = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "request_id": info["request_id"],
               "key_id": info["key_id"], "client": f"{client[0]}:{client[1]}", "method": scope["method"],
               "route": scope["path"], "model": info["model"], "status": status, "prompt_tokens": info["prompt_tokens"],
               "completion_tokens": info["completion_tokens"], "latency_ms": round((time.monotonic() - t0) * 1000, 3),
               "body_sha256": digest, "cache": info["cache"]}
        if cfg.audit_content:
            rec["body"] = body.decode("utf-8", "replace")
        if self.state.metrics is not None:
            self.state.metrics.requests.labels(route=scope["path"] if scope["path"] in _ROUTES else "other",
                                               status=str(status)).inc()
        if cfg.rate_limiter is not None and (info["prompt_tokens"] or info["completion_tokens"]):
            cfg.rate_limiter.charge(info["key_id"] or client[0], info["prompt_tokens"] + info["completion_tokens"])
        if cfg.audit is not None:
            await asyncio.shield(asyncio.to_thread(cfg.audit.write, rec))
        log.info(json.dumps({k: v for k, v in rec.items() if k != "body"}))


_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize", "/detokenize"}
