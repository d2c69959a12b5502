"""A 128K-token prompt through `dsv3 serve` on a V4-shaped model: the request's long-context promise, end to end.

    python bench/serve_long_prompt.py [--family v4] [--tokens 131072] [--max-tokens 8] [--threads 2]

Builds (or reuses) the random V4-shaped model of bench/long_context.py, starts `dsv3 serve --max-model-len
<tokens + max-tokens>` as a user would, sends one completions request whose prompt is `--tokens` token ids
through the openai client, and prints the time to the first token (the prefill), the decode rate, the
server's peak memory and the cache bytes the sequence holds. Exit 0 only if the answer arrives.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="v4", choices=["v3", "v32", "v4"])
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dsv3-bench")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    import long_context
    import httpx
    from openai import OpenAI

    model_dir = long_context.build(args.family, args.cache / f"long_{args.family}")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "dsv3", "serve", "--model", str(model_dir), "--port", str(port),
           "--max-model-len", str(args.tokens + args.max_tokens), "--max-num-seqs", "1", "--dtype", "fp32"]
    print("$", " ".join(cmd[2:]), flush=True)
    log = open(args.cache / f"serve_long_prompt_{args.family}.log", "w")  # a pipe nobody reads could fill and stall it
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=7200, max_retries=0)
        t0 = time.time()
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                print(Path(log.name).read_text()[-2000:], file=sys.stderr)
                return 1
            if time.time() - t0 > 600:
                print("the server did not become healthy in 10 minutes", file=sys.stderr)
                return 1
            time.sleep(1)
        vocab = 32000
        ids = torch.randint(3, vocab, (args.tokens,), generator=torch.Generator().manual_seed(0)).tolist()
        t = time.perf_counter()
        first = None
        n = 0
        for chunk in client.completions.create(model=client.models.list().data[0].id, prompt=ids,
                                               max_tokens=args.max_tokens, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True}):
            if chunk.choices and chunk.choices[0].text is not None:
                n += 1
                first = first or time.perf_counter()
        end = time.perf_counter()
        if first is None:
            print("no answer", file=sys.stderr)
            return 1
        print(f"{args.family}: prompt {args.tokens} tokens, answered; time to first token {first - t:.1f} s, "
              f"then {(n - 1) / max(end - first, 1e-9):.2f} chunks/s over {n} chunks; server peak RSS "
              f"{peak_rss_mb(proc.pid):.0f} MB ({args.threads} threads)")
        return 0
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


if __name__ == "__main__":
    sys.exit(main())
