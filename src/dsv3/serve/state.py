"""What one server holds: its settings, and the engine once it has loaded.

The model loads in the background after the socket is open, so `/health` can answer 503 while
loading (load balancers then hold traffic back) instead of the port simply refusing connections.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dsv3.serve.audit import AuditLog
from dsv3.serve.auth import APIKeys
from dsv3.serve.cache import ResponseCache
from dsv3.serve.errors import APIError
from dsv3.serve.ratelimit import RateLimiter
from dsv3.serve.structured import GrammarLimits

if TYPE_CHECKING:  # the engine and tokenizer arrive when the model has loaded; the server starts without them
    from dsv3.engine.async_engine import AsyncLLMEngine
    from dsv3.engine.llm_engine import LLMEngine
    from dsv3.io.tokenizer import Tokenizer
    from dsv3.serve.metrics import Metrics
    from dsv3.serve.structured import GrammarBackend


@dataclass
class ServeConfig:
    served_model_name: str = "dsv3"
    keys: APIKeys = field(default_factory=APIKeys)
    protect_health_metrics: bool = False
    max_body_bytes: int = 4 << 20
    rate_limiter: RateLimiter | None = None
    cache: ResponseCache | None = None
    audit: AuditLog | None = None
    audit_content: bool = False
    max_queue: int = 256
    keepalive_s: float = 15.0
    lora_names: list[str] = field(default_factory=list)
    exit_on_engine_death: bool = False  # multi-process engines: a dead rank cannot recover, so stop serving
    exit_on_load_error: bool = False  # stop the server when the model fails to load (`dsv3 serve` without --retry-load)
    grammar_limits: GrammarLimits = field(default_factory=GrammarLimits)
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)
    refusal_log_per_minute: float = 20.0  # audit/access lines per client address for refused (401/413/429) requests
    embedding_pooling: str = "mean"  # /v1/embeddings: mean or last (token) pooling of the final hidden states
    responses_max_entries: int = 1000  # /v1/responses stored for previous_response_id (least recently used out first)
    responses_max_bytes: int = 64 << 20  # ... and their size as JSON, all together


class ServerState:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.engine: LLMEngine | None = None
        self.front: AsyncLLMEngine | None = None
        self.tokenizer: Tokenizer | None = None
        self.load_error: BaseException | None = None
        self.inflight = 0
        self._grammar: GrammarBackend | None = None
        self._grammar_lock: asyncio.Lock | None = None
        self.metrics: Metrics | None = None
        self.responses = None  # dsv3.serve.responses.ResponseStore, set when the route registers

    @property
    def cache(self) -> ResponseCache | None:
        return self.config.cache

    @property
    def ready(self) -> bool:
        return self.front is not None

    def require_ready(self) -> None:
        if self.load_error is not None:
            raise APIError(503, "the model failed to load; see the server log")
        if not self.ready:
            raise APIError(503, "the model is still loading; retry shortly", headers={"Retry-After": "5"})
        if self.front.errored is not None:
            raise APIError(503, "the engine has stopped after an internal error")

    def check_model(self, name: str | None) -> str:
        names = [self.config.served_model_name, *self.config.lora_names]
        if name is None or name in names:
            return name or self.config.served_model_name
        raise APIError(404, f"the model {name!r} does not exist; this server serves {', '.join(map(repr, names))}",
                       param="model", code="model_not_found")

    def adapter_id(self, model: str | None) -> int:
        """The engine's adapter id for a checked model name: 0 = the served base model, k = the k-th --lora."""
        names = self.config.lora_names
        return names.index(model) + 1 if model in names else 0

    async def grammar(self) -> GrammarBackend:
        """The grammar backend, built on first use in a worker thread (a large vocabulary takes a while)."""
        if self._grammar is None:
            from dsv3.serve.structured import GrammarBackend

            self._grammar_lock = self._grammar_lock or asyncio.Lock()
            async with self._grammar_lock:
                if self._grammar is None:
                    def build() -> GrammarBackend:
                        b = GrammarBackend(self.tokenizer, self.engine.model.config.vocab_size, sorted(self.engine.eos_ids),
                                           self.config.grammar_limits)
                        b.pool.start()
                        return b
                    self._grammar = await asyncio.to_thread(build)
        return self._grammar

    def reserve(self, info: dict, count: int, param: str | None = None) -> None:
        """Take `count` of the `max_queue` generation slots for this HTTP request (the gate gives them back when
        it ends): more than the whole queue is a 400, more than what is free a 503 before any byte is sent."""
        limit = self.config.max_queue
        if count > limit:
            raise APIError(400, f"this request asks for {count} generations at once; the server queues at most {limit} "
                                "(--max-queue): split it", param=param)
        if self.inflight + count > limit:
            raise APIError(503, f"the server is at its limit of {limit} queued requests; retry later",
                           code="server_overloaded", headers={"Retry-After": "1"})
        self.inflight += count
        info["reserved"] = info.get("reserved", 0) + count

    def release(self, info: dict) -> None:
        self.inflight -= info.pop("reserved", 0)
