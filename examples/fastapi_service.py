"""A FastAPI service that runs a dsv3 model in its own process through the Python API (`dsv3.LLM`).

    python examples/fastapi_service.py --model DIR --port 8080        # no --model: the embedded model
    curl -s localhost:8080/complete -H 'content-type: application/json' -d '{"prompt": "def fib(n):", "max_tokens": 32}'
    curl -s localhost:8080/chat -H 'content-type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Write a function that adds two numbers."}]}'

This is the pattern for putting a model behind your own routes and request types. Requests run one
at a time (one model, one lock); for an OpenAI-compatible server that batches concurrent requests,
use `dsv3 serve`.
"""

import argparse
import threading
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from dsv3 import LLM, SamplingParams
from dsv3.errors import DSV3Error


class CompleteRequest(BaseModel):
    prompt: str = Field(min_length=1)
    max_tokens: int = Field(64, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    stop: list[str] = Field(default_factory=list, max_length=4)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int = Field(256, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)


class Reply(BaseModel):
    text: str
    finish_reason: str | None
    completion_tokens: int


def create_app(model: str | None = None, dtype: str = "auto", max_model_len: int | None = None) -> FastAPI:
    """The service for one model directory (None: the embedded default model)."""
    llm = LLM(model, dtype=dtype, max_model_len=max_model_len)
    lock = threading.Lock()  # the engine serves one caller at a time; FastAPI runs sync routes on a thread pool
    app = FastAPI(title="dsv3 example service")

    def reply(out) -> Reply:
        o = out[0].outputs[0]
        return Reply(text=o.text, finish_reason=o.finish_reason, completion_tokens=len(o.token_ids))

    @app.exception_handler(DSV3Error)
    async def user_error(request: Request, exc: DSV3Error) -> JSONResponse:  # e.g. a prompt longer than the context
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": llm.model_dir.name, "max_model_len": llm.engine.max_model_len}

    @app.post("/complete")
    def complete(req: CompleteRequest) -> Reply:
        params = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, stop=req.stop)
        with lock:
            return reply(llm.generate([req.prompt], params, use_tqdm=False))

    @app.post("/chat")
    def chat(req: ChatRequest) -> Reply:
        params = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature)
        with lock:
            return reply(llm.chat([m.model_dump() for m in req.messages], params))

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the embedded default model)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    args = p.parse_args(argv)
    uvicorn.run(create_app(args.model, args.dtype, args.max_model_len), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
