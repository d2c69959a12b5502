"""Embeddings/s through `dsv3 serve`'s `/v1/embeddings` against HF transformers pooling the same model, in one run.

The same inputs go both ways: `--count` snippets of Python source from this interpreter's standard
library (nothing is downloaded), each cut to exactly `--tokens` tokens of the model's tokenizer and
sent to the server as token ids, so both sides embed identical sequences and HF needs no padding.
The server runs in this process on a free 127.0.0.1 port (uvicorn in a thread, the continuous-
batching engine behind it); `--concurrency` clients each post batches of `--batch` inputs. HF runs
`AutoModel` (DeepseekV3Model) on the same weights in batches of `--batch` and mean-pools
`last_hidden_state`, normalised -- what the server's default `--embedding-pooling mean` computes --
and every server vector is checked against HF's (cosine >= 0.999, else the bench fails). Prints
embeddings/s and tokens/s of both (each side's best of `--repeats` alternating runs), their ratio,
the machine and its load average (on a shared machine the ratio moves with it).

    python bench/embeddings_bench.py                       # the embedded default model, CPU
    python bench/embeddings_bench.py --model DIR --device cuda --count 2048 --tokens 256 --batch 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import sys
import sysconfig
import threading
import time
from pathlib import Path

import httpx
import torch


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    where = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"
    if device.startswith("cuda"):
        where = f"{torch.cuda.get_device_name(torch.device(device))}; host {where}"
    return where


def snippets(tok, count: int, tokens: int) -> list[list[int]]:
    """`count` token-id lists of exactly `tokens` ids: consecutive windows of the standard library's sources."""
    out: list[list[int]] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        ids = tok.encode(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)
        for i in range(0, len(ids) - tokens + 1, tokens):
            out.append(ids[i:i + tokens])
            if len(out) == count:
                return out
    raise SystemExit(f"the standard library holds fewer than {count} snippets of {tokens} tokens")


def start_server(model_dir: str, dtype: str, device: str, max_len: int, batch: int, concurrency: int):
    import uvicorn

    from dsv3.engine import EngineConfig, LLMEngine
    from dsv3.io.load import load_model
    from dsv3.io.tokenizer import Tokenizer
    from dsv3.serve import ServeConfig, create_app

    def load():
        tok = Tokenizer.from_dir(model_dir)
        cfg = EngineConfig(max_num_seqs=max(64, batch * concurrency), max_model_len=max_len,
                           max_num_batched_tokens=max(2048, max_len))
        return LLMEngine(load_model(model_dir, dtype=dtype, device=device, progress=False), tok, cfg), tok

    app = create_app(ServeConfig(served_model_name="bench", max_queue=batch * concurrency + 64,
                                 max_body_bytes=64 << 20), load)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not (server.started and app.state.ready):
        if app.state.load_error is not None:
            raise app.state.load_error
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


async def embed_server(url: str, inputs: list[list[int]], batch: int, concurrency: int) -> tuple[torch.Tensor, float]:
    """All inputs through /v1/embeddings, `concurrency` clients taking batches in turn; (vectors, seconds)."""
    batches = [(i, inputs[i:i + batch]) for i in range(0, len(inputs), batch)]
    out: list[list[float] | None] = [None] * len(inputs)
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        async def client(k: int) -> None:
            for start, chunk in batches[k::concurrency]:
                r = await c.post("/v1/embeddings", json={"model": "bench", "input": chunk})
                r.raise_for_status()
                for d in r.json()["data"]:
                    out[start + d["index"]] = d["embedding"]

        t0 = time.perf_counter()
        await asyncio.gather(*[client(k) for k in range(concurrency)])
        wall = time.perf_counter() - t0
    return torch.tensor(out), wall


def embed_hf(model, inputs: list[list[int]], batch: int, device: str) -> tuple[torch.Tensor, float]:
    vecs = []
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(inputs), batch):
            ids = torch.tensor(inputs[i:i + batch], device=device)
            h = model(input_ids=ids).last_hidden_state.float().mean(1)
            vecs.append(torch.nn.functional.normalize(h, dim=-1).cpu())
    sync()
    return torch.cat(vecs), time.perf_counter() - t0


def run(model_dir: str, count: int = 256, tokens: int = 128, batch: int = 16, concurrency: int = 4,
        device: str = "cpu", dtype: str = "fp32", repeats: int = 3) -> dict:
    """Both sides `repeats` times, alternating; the rates are each side's best run."""
    import transformers

    from dsv3.io.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    inputs = snippets(tok, count, tokens)
    warm = inputs[:batch]
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    hf = transformers.AutoModel.from_pretrained(model_dir, dtype=torch_dtype, attn_implementation="sdpa").to(device).eval()
    server, url = start_server(model_dir, dtype, device, tokens + 16, batch, concurrency)
    t_srv, t_hf = [], []
    try:
        asyncio.run(embed_server(url, warm, batch, 1))  # first-call costs (threads, allocator) out of the timing
        embed_hf(hf, warm, batch, device)
        for _ in range(repeats):  # alternating, so a busy spell on a shared machine hits both sides alike
            served, t = asyncio.run(embed_server(url, inputs, batch, concurrency))
            t_srv.append(t)
            ref, t = embed_hf(hf, inputs, batch, device)
            t_hf.append(t)
    finally:
        server.should_exit = True
    cos = (served * ref).sum(-1)
    best_srv, best_hf = min(t_srv), min(t_hf)
    stats = {"model": str(model_dir), "device": device, "dtype": dtype, "machine": machine(device), "count": count,
             "tokens": tokens, "batch": batch, "concurrency": concurrency, "repeats": repeats,
             "dim": int(served.shape[1]), "server_s": t_srv, "hf_s": t_hf, "server_emb_per_s": count / best_srv,
             "hf_emb_per_s": count / best_hf, "server_tok_per_s": count * tokens / best_srv,
             "hf_tok_per_s": count * tokens / best_hf, "ratio": best_hf / best_srv, "min_cosine": float(cos.min()),
             "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    return stats


def report(s: dict) -> str:
    return (f"{s['count']} inputs x {s['tokens']} tokens, batches of {s['batch']}, {s['concurrency']} clients, "
            f"{s['device']} {s['dtype']}: server {s['server_emb_per_s']:.1f} emb/s ({s['server_tok_per_s']:.0f} tok/s), "
            f"HF transformers {s['hf_emb_per_s']:.1f} emb/s ({s['hf_tok_per_s']:.0f} tok/s), "
            f"server/HF {s['ratio']:.2f}x (best of {s['repeats']}); min cosine to HF {s['min_cosine']:.6f} | {s['machine']}"
            + (f", load average {s['load_average']:.1f}" if s.get("load_average") is not None else ""))


def main(argv: list[str] | None = None) -> int:
    from dsv3.io.paths import default_model_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: the embedded default model)")
    ap.add_argument("--count", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating (the best counts)")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args(argv)
    stats = run(str(args.model or default_model_dir()), args.count, args.tokens, args.batch, args.concurrency,
                args.device, args.dtype, args.repeats)
    print(report(stats))
    if args.json:
        Path(args.json).write_text(json.dumps(stats, indent=2) + "\n")
    if stats["min_cosine"] < 0.999:
        print(f"embeddings_bench: error: the server's vectors differ from HF's (min cosine {stats['min_cosine']:.6f})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
