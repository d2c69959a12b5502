"""Bounded load test for `dsv3 serve`: N concurrent streaming clients on 127.0.0.1 only.

Every stream is checked: it must end with `data: [DONE]`, carry a finish reason, report the
requested number of tokens in its usage chunk, and (greedy decoding) spell exactly the text a
non-streamed request returns for the same prompt. Prints throughput and p50/p99 time to first
token and inter-token latency.

    python bench/serve_load.py --url http://127.0.0.1:8000 --concurrency 64 --max-tokens 32
    python bench/serve_load.py --model path/to/model     # starts its own server on a free local port
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlparse

import httpx
from tqdm.auto import tqdm

PROMPTS = ["def fib(n):", "import numpy as np\n", "class Stack:", "for i in range(10):", "# a quick sort\n",
           "while True:", "with open(path) as f:", "return sorted("]
LOCAL = {"127.0.0.1", "localhost", "::1"}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def _one(c: httpx.AsyncClient, prompt: str, max_tokens: int, headers: dict) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    t0, times, text, finish, usage, done = time.perf_counter(), [], "", None, None, False
    async with c.stream("POST", "/v1/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            return {"ok": False, "why": f"HTTP {r.status_code}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            ev = json.loads(line[6:])
            if "error" in ev:
                return {"ok": False, "why": ev["error"]["message"]}
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev["choices"]:
                if ch["text"]:
                    times.append(time.perf_counter())
                text += ch["text"]
                finish = ch["finish_reason"] or finish
    return {"ok": done and finish is not None and usage is not None and usage["completion_tokens"] == max_tokens,
            "why": "incomplete stream", "text": text, "ttft": times[0] - t0 if times else None,
            "itl": [b - a for a, b in zip(times, times[1:])], "tokens": usage["completion_tokens"] if usage else 0,
            "prompt": prompt}


async def run_load(url: str, concurrency: int = 64, requests_per_client: int = 1, max_tokens: int = 32,
                   api_key: str | None = None, progress: bool = False) -> dict:
    host = urlparse(url).hostname
    if host not in LOCAL:
        raise SystemExit(f"serve_load only targets 127.0.0.1/localhost, not {host!r}")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits, verify=False) as c:
        refs = {}
        for p in PROMPTS:  # the non-streamed answers every stream must reproduce
            r = await c.post("/v1/completions", json={"prompt": p, "max_tokens": max_tokens, "temperature": 0,
                                                      "ignore_eos": True}, headers={**headers, "x-dsv3-cache": "bypass"})
            r.raise_for_status()
            refs[p] = r.json()["choices"][0]["text"]

        bar = tqdm(total=concurrency * requests_per_client, desc="streams", disable=not progress)

        async def client(i: int) -> list[dict]:
            out = []
            for k in range(requests_per_client):
                out.append(await _one(c, PROMPTS[(i + k) % len(PROMPTS)], max_tokens, headers))
                bar.update(1)
            return out

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*[client(i) for i in range(concurrency)]) for r in rs]
        wall = time.perf_counter() - t0
        bar.close()
    bad = [r for r in results if not r["ok"] or r["text"] != refs[r["prompt"]]]
    ttft = [r["ttft"] for r in results if r.get("ttft") is not None]
    itl = [x for r in results for x in r.get("itl", [])]
    tokens = sum(r.get("tokens", 0) for r in results)
    return {"requests": len(results), "failed": len(bad), "wall_s": wall, "output_tok_per_s": tokens / wall,
            "ttft_p50_ms": pct(ttft, 50) * 1e3, "ttft_p99_ms": pct(ttft, 99) * 1e3,
            "itl_p50_ms": pct(itl, 50) * 1e3, "itl_p99_ms": pct(itl, 99) * 1e3,
            "first_failure": (bad[0].get("why") if bad else None)}


def report(stats: dict) -> str:
    return (f"{stats['requests']} streams ({stats['failed']} failed) in {stats['wall_s']:.2f} s | "
            f"{stats['output_tok_per_s']:.1f} output tok/s | TTFT p50 {stats['ttft_p50_ms']:.1f} ms, "
            f"p99 {stats['ttft_p99_ms']:.1f} ms | ITL p50 {stats['itl_p50_ms']:.1f} ms, p99 {stats['itl_p99_ms']:.1f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=None, help="a running server (127.0.0.1 only)")
    ap.add_argument("--model", default=None, help="start an in-process server on this model directory instead")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--requests-per-client", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()
    if (args.url is None) == (args.model is None):
        ap.error("give exactly one of --url and --model")
    if args.url:
        stats = asyncio.run(run_load(args.url, args.concurrency, args.requests_per_client, args.max_tokens, args.api_key,
                                     progress=True))
    else:
        stats = _with_local_server(args)
    print(report(stats))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(stats, f, indent=2)
    return 0 if stats["failed"] == 0 else 1


def _with_local_server(args: argparse.Namespace) -> dict:
    import socket
    import threading

    import uvicorn

    from dsv3.io.load import load_model
    from dsv3.engine import EngineConfig, LLMEngine
    from dsv3.serve import ServeConfig, create_app
    from dsv3.io.tokenizer import Tokenizer

    def load():
        tok = Tokenizer.from_dir(args.model)
        return LLMEngine(load_model(args.model), tok, EngineConfig(max_num_seqs=max(64, args.concurrency))), tok

    app = create_app(ServeConfig(max_queue=args.concurrency * 2 + 16), load)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not (server.started and app.state.ready):
        if app.state.load_error is not None:
            raise app.state.load_error
        time.sleep(0.1)
    try:
        return asyncio.run(run_load(f"http://127.0.0.1:{port}", args.concurrency, args.requests_per_client,
                                    args.max_tokens, args.api_key, progress=True))
    finally:
        server.should_exit = True


if __name__ == "__main__":
    sys.exit(main())
