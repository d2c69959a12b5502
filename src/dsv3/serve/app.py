"""The FastAPI application: OpenAI routes, health, metrics, tokenizer routes and the OpenAPI docs.

`create_app(config, load)` opens for traffic at once and runs `load()` (model + tokenizer + engine)
in a worker thread; until it returns, `/health` and the generation routes answer 503. Shutdown
(SIGTERM through uvicorn) stops the engine loop, then flushes and closes the audit log and cache.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from contextlib import asynccontextmanager
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from dsv3.errors import DSV3Error
from dsv3.serve import chat, completions, embeddings, responses
from dsv3.serve.errors import error_response, install_error_handlers
from dsv3.serve.gate import Gate
from dsv3.serve.generation import encode
from dsv3.serve.metrics import Metrics
from dsv3.serve.protocol import DetokenizeRequest, TokenizeRequest
from dsv3.serve.state import ServeConfig, ServerState
from dsv3.serve.streaming import json_body
from dsv3.io.chat_template import DEEPSEEK_V3_CHAT_TEMPLATE, select_template
from dsv3.io.tokenizer import LONG_TEXT

log = logging.getLogger("dsv3.serve")

Loader = Callable[[], tuple[Any, Any]]  # () -> (LLMEngine, Tokenizer)


def create_app(config: ServeConfig, load: Loader) -> FastAPI:
    st = ServerState(config)
    st.metrics = Metrics(lambda: st)

    async def _load() -> None:
        from dsv3.engine.async_engine import AsyncLLMEngine

        try:
            engine, tokenizer = await asyncio.to_thread(load)
            if config.cache is not None:  # answers are stored per weights: never serve another model's
                from dsv3.serve.cache import weights_fingerprint

                fingerprint = await asyncio.to_thread(weights_fingerprint, engine.model, config.lora_names)
                await asyncio.to_thread(config.cache.bind, fingerprint)
            front = AsyncLLMEngine(engine)
            front.start()
        except Exception as e:  # reported by /health, the process staying up to show why, unless exit_on_load_error
            st.load_error = e
            if isinstance(e, DSV3Error):  # a user error (bad path, bad config): its sentence is the whole story
                log.error("model load failed: %s", e)
            else:
                log.exception("model load failed")
            if config.exit_on_load_error:  # `dsv3 serve`: stop now; it exits 2 with the reason
                os.kill(os.getpid(), signal.SIGTERM)
            return
        st.engine, st.tokenizer, st.front = engine, tokenizer, front
        log.info("model loaded; serving %s", config.served_model_name)

    async def _watch_engine() -> None:
        """With exit_on_engine_death: once the engine loop dies, answer 503 for a moment, then shut down."""
        while not (st.front is not None and st.front.errored is not None):
            await asyncio.sleep(0.5)
        log.error("the engine stopped (%s); shutting the server down", st.front.errored)
        await asyncio.sleep(2.0)
        os.kill(os.getpid(), signal.SIGTERM)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(_load())
        watcher = asyncio.create_task(_watch_engine()) if config.exit_on_engine_death else None
        try:
            yield
        finally:
            task.cancel()
            if watcher is not None:
                watcher.cancel()
            if st.front is not None:
                await asyncio.to_thread(st.front.shutdown)
            if st._grammar is not None:
                await asyncio.to_thread(st._grammar.close)
            if config.audit is not None:
                config.audit.close()
            if config.cache is not None:
                config.cache.close()

    app = FastAPI(title="dsv3", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for DeepSeek-V3-architecture models")
    app.state.dsv3 = st
    install_error_handlers(app)
    chat.register(app, st)
    completions.register(app, st)
    embeddings.register(app, st)
    responses.register(app, st)

    def model_cards() -> list[dict]:
        now = int(time.time())
        limit = st.engine.max_model_len if st.ready else None
        data = [{"id": config.served_model_name, "object": "model", "created": now, "owned_by": "dsv3",
                 "root": config.served_model_name, "parent": None, "max_model_len": limit}]
        data += [{"id": n, "object": "model", "created": now, "owned_by": "dsv3", "root": n,
                  "parent": config.served_model_name, "max_model_len": limit} for n in config.lora_names]
        return data

    @app.get("/v1/models", tags=["openai"])
    async def models():
        """The served model (and LoRA adapters), in OpenAI's list shape."""
        return {"object": "list", "data": model_cards()}

    @app.get("/v1/models/{model_id:path}", tags=["openai"])
    async def model(model_id: str):
        """One served model (or LoRA adapter) by id; 404 for any other id."""
        card = next((c for c in model_cards() if c["id"] == model_id), None)
        if card is None:
            return error_response(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        return card

    @app.get("/tokenizer_info", tags=["tokenizer"])
    async def tokenizer_info():
        """The served tokenizer's settings (vLLM's route): what a client needs to tokenize as the server does
        (lm-eval's `local-completions` finds it and then tokenizes through /tokenize, downloading nothing)."""
        st.require_ready()
        tok = st.tokenizer
        names = tok.special_tokens
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": names.get("bos_token"),
                "eos_token": names.get("eos_token"), "pad_token": names.get("pad_token"), "unk_token": names.get("unk_token"),
                "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "add_bos_token": tok.add_bos_token,
                "add_eos_token": tok.add_eos_token,
                "chat_template": select_template(tok.chat_template) or DEEPSEEK_V3_CHAT_TEMPLATE, "model_max_length": st.engine.max_model_len, "vocab_size": st.engine.model.config.vocab_size}

    @app.get("/health", tags=["ops"])
    async def health():
        """200 when ready; 503 while loading, after a failed load, or once the engine loop died."""
        if st.load_error is not None:
            return error_response(503, "the model failed to load", code="load_failed")
        if not st.ready:
            return error_response(503, "the model is still loading", code="loading")
        if st.front.errored is not None:
            return error_response(503, "the engine stopped after an internal error", code="engine_dead")
        return Response(status_code=200)

    @app.get("/metrics", tags=["ops"])
    async def metrics():
        """Prometheus text exposition (`dsv3:` names mirror vLLM's `vllm:` ones)."""
        return Response(st.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize", tags=["tokenizer"])
    async def tokenize(req: TokenizeRequest, request: Request):
        """Token ids of a prompt, or of a chat rendered with the model's template."""
        st.require_ready()
        request.scope["dsv3"]["model"] = st.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            return error_response(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
        if req.messages is not None:
            text = st.tokenizer.apply_chat_template([{"role": m.role, "content": m.text() or ""} for m in req.messages])
            ids = await encode(st, text, add_special_tokens=False, fit=False)
        else:
            ids = await encode(st, req.prompt, add_special_tokens=req.add_special_tokens, fit=False)
        body = await json_body({"tokens": ids, "count": len(ids), "max_model_len": st.engine.max_model_len}, len(ids))
        return Response(body, media_type="application/json")

    @app.post("/detokenize", tags=["tokenizer"])
    async def detokenize(req: DetokenizeRequest, request: Request):
        """The text of a list of token ids."""
        st.require_ready()
        request.scope["dsv3"]["model"] = st.check_model(req.model)
        vocab = st.engine.model.config.vocab_size
        if req.tokens and not (0 <= min(req.tokens) and max(req.tokens) < vocab):
            bad = next(t for t in req.tokens if not 0 <= t < vocab)
            return error_response(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
        if len(req.tokens) > LONG_TEXT:  # off the event loop, with the GIL released
            return {"prompt": await asyncio.to_thread(st.tokenizer.decode, req.tokens)}
        return {"prompt": st.tokenizer.decode(req.tokens)}

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return error_response(404, f"there is no route {request.method} {request.url.path}")

    return Gate(app, st)
