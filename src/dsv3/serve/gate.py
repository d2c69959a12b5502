"""The ASGI gate every HTTP request passes: body limit, API key, rate limit, audit line, request count.

It reads the body once (refusing more than `max_body_bytes` with 413) so it can hash it for the
audit log, then replays it to the app. The audit line is written -- fsynced -- before the last
byte of the response goes out: before the final JSON body, and for a stream before the chunk that
carries `data: [DONE]`, so no client ever holds a complete answer the log does not know about.

What a client controls is bounded here: a request id it sends is used only if it is 1-128
printable ASCII characters (else one is made up), the route recorded is cut to 256 characters,
refused requests (401, 413, 429) are logged without their body and at most
`refusal_log_per_minute` lines per client address, and `X-Forwarded-For` is read only when the peer
is one of `trusted_proxies`. Generation slots a handler reserved (`ServerState.reserve`) are given
back when the request ends, however it ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import re
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from dsv3.serve.errors import error_bytes
from dsv3.serve.ratelimit import RefusalLog
from dsv3.serve.state import ServerState

log = logging.getLogger("dsv3.serve.access")

PUBLIC = ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")
REFUSED = (401, 413, 429)
DONE = b"data: [DONE]\n\n"
_REQUEST_ID = re.compile(r"[!-~]{1,128}")
MAX_ROUTE_CHARS = 256


def client_address(peer: str, forwarded: list[str], trusted: list) -> str:
    """The client's address: the peer, or -- while the hop is a trusted proxy -- the next X-Forwarded-For entry
    from the right (the way nginx's real_ip_recursive reads it)."""
    if not trusted:
        return peer
    hops = [h.strip() for v in forwarded for h in v.split(",") if h.strip()]
    addr = peer
    while hops:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return addr
        if not any(ip in net for net in trusted):
            return addr
        candidate = hops.pop()
        try:
            ipaddress.ip_address(candidate)
        except ValueError:
            return addr  # a malformed entry: stop at the last hop we can vouch for
        addr = candidate
    return addr


class Gate:
    def __init__(self, app: Any, state: ServerState):
        self.app, self.state = app, state
        self.refusals = RefusalLog(state.config.refusal_log_per_minute)

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
        headers: dict[str, str] = {}
        forwarded: list[str] = []
        for k, v in scope.get("headers", []):
            name = k.decode("latin-1").lower()
            headers[name] = v.decode("latin-1")
            if name == "x-forwarded-for":
                forwarded.append(headers[name])
        given = headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        peer = scope.get("client") or ("", 0)
        client = client_address(peer[0], forwarded, cfg.trusted_proxies)
        info: dict[str, Any] = {"request_id": rid, "key_id": None, "model": None, "prompt_tokens": 0,
                                "completion_tokens": 0, "cache": None, "client": client,
                                "client_port": peer[1] if client == peer[0] else None}
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
            elif message["type"] == "http.response.body" and (
                    not message.get("more_body", False) or message.get("body", b"").endswith(DONE)):
                await finish(sent["status"] or 500)  # durable before the client holds the whole answer
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
                who = info["key_id"] or client
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
            self.state.release(info)
            if not sent["logged"]:  # the client went away mid-response, or the app raised
                await finish(sent["status"] or 499)

    async def _record(self, scope: dict, info: dict, status: int, t0: float, digest: str, body: bytes) -> None:
        cfg = self.state.config
        route = scope["path"]
        rec = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "request_id": info["request_id"],
               "key_id": info["key_id"], "client": info["client"] if info["client_port"] is None
               else f"{info['client']}:{info['client_port']}", "method": scope["method"][:16],
               "route": route if len(route) <= MAX_ROUTE_CHARS else route[:MAX_ROUTE_CHARS] + "...",
               "model": info["model"], "status": status, "prompt_tokens": info["prompt_tokens"],
               "completion_tokens": info["completion_tokens"], "latency_ms": round((time.monotonic() - t0) * 1000, 3),
               "body_sha256": digest, "cache": info["cache"]}
        if self.state.metrics is not None:
            self.state.metrics.requests.labels(route=route if route in _ROUTES else "other", status=str(status)).inc()
        if cfg.rate_limiter is not None and (info["prompt_tokens"] or info["completion_tokens"]):
            cfg.rate_limiter.charge(info["key_id"] or info["client"], info["prompt_tokens"] + info["completion_tokens"])
        if status in REFUSED:  # no body, and a bounded number of lines per address
            write, suppressed = self.refusals.admit(info["client"])
            if not write:
                return
            if suppressed:
                rec["suppressed"] = suppressed
        elif cfg.audit_content:
            rec["body"] = body.decode("utf-8", "replace")
        if cfg.audit is not None:
            await asyncio.shield(asyncio.to_thread(cfg.audit.write, rec))
        log.info(json.dumps({k: v for k, v in rec.items() if k != "body"}))


_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize", "/detokenize",
           "/v1/embeddings", "/v1/responses", "/tokenizer_info"}
