"""`POST /v1/embeddings`: each input's final hidden states pooled into one vector, batched through the engine.

Every input (a string, a list of strings, a list of token ids, a list of id lists) becomes one
pooling request (dsv3.engine.pooling) that runs in the engine's steps beside the generations; the
route answers when all are done. The server's pooling (`--embedding-pooling mean|last`) is applied,
the vectors are L2-normalised (vLLM's `normalize: false` turns that off), `dimensions` keeps the first
d values and renormalises, and `encoding_format: "base64"` sends little-endian float32 bytes, as
OpenAI does (the openai SDK asks for base64 by default and decodes it).

What these vectors are: a causal language model's pooled states, not a trained embedding model's
(see docs/serve.md, "Embeddings").
"""

from __future__ import annotations

import base64
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from dsv3.engine.llm_engine import RequestFailedError
from dsv3.engine.pooling import PoolingParams
from dsv3.errors import DSV3Error
from dsv3.serve.errors import APIError
from dsv3.serve.generation import encode, new_id, truncate
from dsv3.serve.protocol import EmbeddingRequest
from dsv3.serve.state import ServerState
from dsv3.serve.streaming import json_body, merge


async def _inputs(st: ServerState, req: EmbeddingRequest) -> list[list[int]]:
    x = req.input
    if isinstance(x, str):
        items: list[Any] = [x]
    elif x and all(isinstance(t, int) for t in x):
        items = [x]
    else:
        items = list(x)
    if not items:
        raise APIError(400, "'input' is empty: give a string, a list of strings or token ids", param="input")
    out = []
    for k, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise APIError(400, f"'input' item {k} is an empty string, which has no embedding", param="input")
            item = await encode(st, item, req.add_special_tokens, param="input", fit=not req.truncate_prompt_tokens)
        elif not item:
            raise APIError(400, f"'input' item {k} is an empty list of token ids", param="input")
        ids = truncate(st, req, list(item))
        if not ids:
            raise APIError(400, f"'input' item {k} has no tokens", param="input")
        out.append(ids)
    return out


def _encoded(vec: Any, fmt: str) -> Any:
    arr = vec.numpy().astype("<f4", copy=False)
    return base64.b64encode(arr.tobytes()).decode() if fmt == "base64" else arr.tolist()


def register(app: FastAPI, st: ServerState) -> None:
    @app.post("/v1/embeddings", tags=["openai"])
    async def embeddings(req: EmbeddingRequest, request: Request):
        """Embed text or token ids: pooled final hidden states (see docs/serve.md, "Embeddings")."""
        st.require_ready()
        info = request.scope["dsv3"]
        model = info["model"] = st.check_model(req.model)
        req.check_supported()
        try:
            params = PoolingParams(st.config.embedding_pooling, normalize=req.normalize, dimensions=req.dimensions)
        except DSV3Error as e:
            raise APIError(400, str(e), param="dimensions") from None
        prompts = await _inputs(st, req)
        if len(prompts) > st.config.max_queue:
            raise APIError(400, f"'input' holds {len(prompts)} inputs; the server queues at most {st.config.max_queue} "
                                "at once (--max-queue): split the batch", param="input")
        checked = []
        for k, ids in enumerate(prompts):
            try:
                checked.append(st.engine.validate(ids, params))
            except DSV3Error as e:
                msg = str(e)
                raise APIError(400, f"'input' item {k}: {msg}" if len(prompts) > 1 else msg,
                               param="dimensions" if "dimensions" in msg else "input") from None
        st.reserve(info, len(prompts), param="input")
        info["prompt_tokens"] = n_tokens = sum(len(p) for p in prompts)
        rid = new_id("embd")
        adapter = st.adapter_id(model)
        kw = {"adapter_id": adapter} if adapter else {}
        vectors: dict[int, Any] = {}
        try:
            async for k, out in merge([st.front.generate(r, None, f"{rid}-{k}", **kw) for k, r in enumerate(checked)]):
                if out.finished:
                    vectors[k] = out.outputs.data
        except RequestFailedError as e:
            raise APIError(422, f"this request failed inside the engine and was stopped ({e}); other requests are not "
                                "affected", code="generation_failed") from None
        except RuntimeError as e:
            raise APIError(503, f"the engine failed: {e}") from None
        data = [{"object": "embedding", "index": k, "embedding": _encoded(vectors[k], req.encoding_format)}
                for k in range(len(prompts))]
        body = {"id": rid, "object": "list", "created": int(time.time()), "model": model, "data": data,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}
        dims = len(data[0]["embedding"]) if req.encoding_format == "float" else 0
        return Response(await json_body(body, len(data) * dims), media_type="application/json")

