"""Test doubles for `dsv3 eval`: a toy OpenAI-compatible server and a scripted in-process model.

Imported by the other test_eval_* files (it holds no tests itself). The toy "model" is a pure
function of text, so every expected log-likelihood and every expected score is known exactly:
  * tokens are whitespace-prefixed words (`toy_tokens`);
  * after a prompt ending in "Answer:", the letter whose option reads "pick-me" in the last
    question gets log-prob -0.1 and every other letter -3.0 (so MMLU answers are scripted);
  * every other token gets a deterministic pseudo-random log-prob from a CRC of its context.
"""

from __future__ import annotations

import json
import re
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from dsv3.eval.backends import Backend, Loglikelihood, RollingScore, cut_at_stop

TOKEN = re.compile(r"\s*\S+|\s+")


def toy_tokens(text: str) -> list[tuple[int, str]]:
    return [(m.start(), m.group()) for m in TOKEN.finditer(text)]


def favored_letter(prefix: str) -> str | None:
    if not prefix.endswith("Answer:"):
        return None
    block = prefix[prefix.rfind("\n\n") + 2:]
    m = re.search(r"\n([ABCD])\. pick-me\n", block)
    return m.group(1) if m else None


def toy_logprob(prefix: str, token: str) -> float:
    fav = favored_letter(prefix)
    if fav is not None and token.strip() in ("A", "B", "C", "D"):
        return -0.1 if token.strip() == fav else -3.0
    h = zlib.crc32((prefix[-32:] + "\x00" + token).encode())
    return -0.5 - (h % 1000) / 250.0


def toy_text_logprob(text: str, start_char: int = 0) -> float:
    """Sum of toy log-probs of the tokens of `text` starting at or after `start_char` (first token unscored)."""
    return sum(toy_logprob(text[:o], t) for i, (o, t) in enumerate(toy_tokens(text)) if i > 0 and o >= start_char)


class ScriptedBackend(Backend):
    """An in-process stand-in with scripted answers: MMLU via `toy_logprob`, generation via `generator`."""

    name = "scripted"

    def __init__(self, generator: Callable[[str], str] | None = None):
        self.generator = generator or (lambda prompt: "")
        self.requests: list[tuple[str, str]] = []
        self.prompts: list[str] = []
        self.gen_kwargs: dict = {}

    def loglikelihood(self, requests, desc=""):
        self.requests += list(requests)
        return [Loglikelihood(toy_logprob(c, x), toy_logprob(c, x) > -0.2) for c, x in requests]

    def generate(self, prompts, *, stop, max_tokens, temperature=0.0, top_p=1.0, n=1, seed=None, desc=""):
        self.prompts += list(prompts)
        self.gen_kwargs = dict(stop=tuple(stop), max_tokens=max_tokens, temperature=temperature, n=n, seed=seed)
        return [[cut_at_stop(self.generator(p), stop) for _ in range(n)] for p in prompts]

    def rolling_loglikelihood(self, texts, window, stride, desc=""):
        return [RollingScore(toy_text_logprob(t), max(0, len(toy_tokens(t)) - 1)) for t in texts]


class FakeOpenAIServer:
    """A threaded HTTP server speaking enough of the OpenAI API to exercise the client.

    mode: "full" (echo + prompt logprobs), "no_logprobs" (logprobs: null), "gen_only" (echo
    ignored, logprobs only for generated text), "reject_max0" (400 on max_tokens=0),
    "ignore_n" (one choice whatever n is). `fail_429`/`fail_500` make the next requests fail.
    """

    def __init__(self, generator: Callable[[str], str] | None = None, mode: str = "full", api_key: str | None = None):
        self.generator = generator or (lambda prompt: " 0")
        self.mode, self.api_key = mode, api_key
        self.fail_429 = self.fail_500 = self.stall = 0  # stall: the next N requests answer after 1 s
        self.requests: list[tuple[str, dict | None, dict]] = []  # (path, payload, headers)
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> "FakeOpenAIServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def completion(self, prompt: str, payload: dict) -> list[dict]:
        n = 1 if self.mode == "ignore_n" else int(payload.get("n", 1))
        choices = []
        for i in range(n):
            gen = self.generator(prompt) if payload.get("max_tokens", 16) > 0 else ""
            words = toy_tokens(gen)[: payload.get("max_tokens", 16)]
            gen = cut_at_stop("".join(t for _, t in words), payload.get("stop") or [])
            choice = {"index": i, "text": (prompt + gen) if payload.get("echo") else gen, "finish_reason": "stop"}
            if payload.get("logprobs") is not None and self.mode != "no_logprobs":
                full = prompt + gen
                toks = toy_tokens(full)
                if self.mode == "gen_only" or not payload.get("echo"):
                    toks = [(o, t) for o, t in toks if o >= len(prompt)]
                lps = [None if o == 0 else toy_logprob(full[:o], t) for o, t in toks]
                tops = [None if lp is None else ({t: lp} if lp > -0.2 else {"<other>": -0.1})
                        for (_, t), lp in zip(toks, lps)]
                choice["logprobs"] = {"tokens": [t for _, t in toks], "token_logprobs": lps, "top_logprobs": tops,
                                      "text_offset": [o for o, _ in toks]}
            else:
                choice["logprobs"] = None
            choices.append(choice)
        return choices

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def reply(self, code: int, body: dict, headers: dict | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def handle_any(self, payload: dict | None) -> None:
                with server.lock:
                    server.requests.append((self.path, payload, dict(self.headers)))
                    fail = "429" if server.fail_429 else "500" if server.fail_500 else None
                    server.fail_429 = max(0, server.fail_429 - 1) if fail == "429" else server.fail_429
                    server.fail_500 = max(0, server.fail_500 - 1) if fail == "500" else server.fail_500
                    stall, server.stall = server.stall > 0, max(0, server.stall - 1)
                if stall:
                    time.sleep(1.0)
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self.reply(401, {"error": {"message": "Invalid API key", "type": "auth"}})
                if fail == "429":
                    return self.reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
                if fail == "500":
                    return self.reply(500, {"error": {"message": "boom"}})
                if self.path == "/v1/models":
                    return self.reply(200, {"object": "list", "data": [{"id": "toy-model", "object": "model"}]})
                if self.path == "/v1/completions":
                    if server.mode == "reject_max0" and payload.get("max_tokens") == 0:
                        return self.reply(400, {"error": {"message": "max_tokens must be at least 1"}})
                    return self.reply(200, {"object": "text_completion", "model": payload.get("model"),
                                            "choices": server.completion(payload["prompt"], payload)})
                if self.path == "/v1/chat/completions":
                    content = payload["messages"][-1]["content"]
                    n = 1 if server.mode == "ignore_n" else int(payload.get("n", 1))
                    choices = [{"index": i, "message": {"role": "assistant", "content": server.generator(content)},
                                "finish_reason": "stop"} for i in range(n)]
                    return self.reply(200, {"object": "chat.completion", "choices": choices})
                return self.reply(404, {"error": {"message": f"no route {self.path}"}})

            def do_GET(self):
                self.handle_any(None)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                self.handle_any(json.loads(self.rfile.read(length)))

        return Handler
