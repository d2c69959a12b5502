"""Any OpenAI-compatible server as an evaluation backend (dsv3 serve, vLLM, SGLang, llama.cpp ...).

Log-likelihoods come from `/v1/completions` with `echo=true, logprobs=1, max_tokens=0`: the
server returns a log-probability for every prompt token and we sum those of the continuation.
Servers that answer such a request without prompt logprobs are refused loudly: scoring them
would silently put every multiple-choice task at chance (lm-eval issues #1411, #4158).
Only the standard library is used (urllib + a thread pool), so no extra dependency is needed.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from tqdm import tqdm

from dsv3.errors import DSV3Error
from dsv3.eval.backends import Backend, Loglikelihood, RollingScore, cut_at_stop, split_trailing_space
from dsv3.eval.windows import text_windows

MAX_STOP = 4  # OpenAI rejects more than four stop strings; the rest are applied client-side


class ServerError(DSV3Error):
    """The server could not be reached, refused a request, or answered in an unusable shape."""


class NoPromptLogprobsError(ServerError):
    """The server does not return prompt-token logprobs, so it cannot score continuations."""


def api_root(base_url: str) -> str:
    """`http://host:8000`, `.../v1` and `.../v1/` all name the same API root `.../v1`."""
    url = base_url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ServerError(f"--base-url {base_url!r} is not an http:// or https:// URL.")
    return url if url.endswith("/v1") else url + "/v1"


class OpenAIBackend(Backend):
    """A remote model behind `/v1/models`, `/v1/completions` and optionally `/v1/chat/completions`."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None, chat: bool = False,
                 concurrency: int = 8, timeout: float = 300.0, max_retries: int = 5, backoff: float = 0.5):
        self.root = api_root(base_url)
        self.api_key, self.chat = api_key, chat
        self.concurrency, self.timeout = max(1, concurrency), timeout
        self.max_retries, self.backoff = max_retries, backoff
        self.echo_max_tokens = 0
        self.name = model or self.default_model()

    # -- transport ---------------------------------------------------------------------------
    def request(self, path: str, payload: dict | None = None) -> dict:
        """GET (no payload) or POST JSON; retry 429/5xx/timeouts with exponential backoff."""
        url = self.root + path
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if payload is None else json.dumps(payload).encode()
        for attempt in range(self.max_retries + 1):
            req = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    body = resp.read()
                try:
                    return json.loads(body)
                except ValueError:
                    raise ServerError(f"the server at {url} answered with something that is not JSON.") from None
            except urllib.error.HTTPError as e:
                retry = e.code == 429 or e.code >= 500
                if not retry or attempt == self.max_retries:
                    raise ServerError(f"the server at {url} answered HTTP {e.code}: {_error_message(e)}.") from None
                delay = _retry_after(e) or self.backoff * 2 ** attempt
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                reason = e.reason if isinstance(e, urllib.error.URLError) else e
                transient = isinstance(reason, (socket.timeout, TimeoutError, ConnectionResetError,
                                                http.client.RemoteDisconnected))
                if not transient or attempt == self.max_retries:
                    raise ServerError(f"cannot reach the server at {url}: {reason or type(reason).__name__}.") from None
                delay = self.backoff * 2 ** attempt
            time.sleep(delay)
        raise AssertionError("unreachable")

    def default_model(self) -> str:
        data = self.request("/models").get("data") or []
        if not data or not isinstance(data[0], dict) or "id" not in data[0]:
            raise ServerError(f"the server at {self.root}/models lists no model; pass --model NAME.")
        return str(data[0]["id"])

    def parallel(self, fn: Callable[[Any], Any], items: Sequence[Any], desc: str, unit: str) -> list[Any]:
        """Apply `fn` to every item on a thread pool, in order, with a progress bar."""
        with ThreadPoolExecutor(self.concurrency) as pool, \
                tqdm(total=len(items), desc=desc, unit=unit, disable=None) as bar:
            futures = [pool.submit(fn, x) for x in items]
            results = []
            try:
                for f in futures:
                    results.append(f.result())
                    bar.update(1)
            except BaseException:
                for f in futures:  # fail fast: drop what has not started
                    f.cancel()
                raise
            return results

    # -- prompt log-probabilities ------------------------------------------------------------
    def prompt_logprobs(self, prompt: str) -> list[tuple[int, str, float | None, dict | None]]:
        """(char offset, token, logprob, top logprobs) for every token of `prompt`, as echoed back."""
        payload = {"model": self.name, "prompt": prompt, "max_tokens": self.echo_max_tokens, "echo": True,
                   "logprobs": 1, "temperature": 0.0}
        try:
            resp = self.request("/completions", payload)
        except ServerError as e:
            if payload["max_tokens"] or "HTTP 400" not in str(e):  # the payload's value: threads race on the attribute
                raise
            self.echo_max_tokens = 1  # some servers insist on generating at least one token
            return self.prompt_logprobs(prompt)
        return parse_echo(resp, prompt, self.root + "/completions")

    def loglikelihood(self, requests, desc="loglikelihood"):
        def one(req: tuple[str, str]) -> Loglikelihood:
            context, continuation = split_trailing_space(*req)
            total, greedy = 0.0, True
            for off, tok, lp, top in self.prompt_logprobs(context + continuation):
                if off + len(tok) > len(context) and lp is not None:
                    total += lp
                    greedy = greedy and bool(top) and max(top.values()) <= lp + 1e-6
            return Loglikelihood(total, greedy)

        return self.parallel(one, list(requests), desc, "req")

    def rolling_loglikelihood(self, texts, window, stride, desc="perplexity"):
        chars_per_token = 4  # the server's tokenizer is unknown; windows are sized in characters
        jobs = [(t, w) for t, text in enumerate(texts)
                for w in text_windows(text, window * chars_per_token, stride * chars_per_token)]

        def one(job: tuple[int, tuple[int, int, int]]) -> tuple[float, int]:
            t, (start, score_from, end) = job
            total, count = 0.0, 0
            for off, _tok, lp, _top in self.prompt_logprobs(texts[t][start:end]):
                if score_from <= start + off < end and lp is not None:
                    total, count = total + lp, count + 1
            return total, count

        sums, counts = [0.0] * len(texts), [0] * len(texts)
        for (t, _), (s, c) in zip(jobs, self.parallel(one, jobs, desc, "window")):
            sums[t] += s
            counts[t] += c
        return [RollingScore(s, c) for s, c in zip(sums, counts)]

    # -- generation --------------------------------------------------------------------------
    def generate(self, prompts, *, stop, max_tokens, temperature=0.0, top_p=1.0, n=1, seed=None, desc="generate"):
        def one(prompt: str) -> list[str]:
            texts: list[str] = []
            while len(texts) < n:  # servers that ignore `n` return fewer choices: ask again
                payload = {"model": self.name, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                           "n": n - len(texts), "stop": list(stop)[:MAX_STOP]}
                if seed is not None:
                    payload["seed"] = seed + len(texts)
                if self.chat:
                    payload["messages"] = [{"role": "user", "content": prompt}]
                    choices = self.request("/chat/completions", payload).get("choices") or []
                    got = [(c.get("message") or {}).get("content") for c in _by_index(choices)]
                else:
                    payload["prompt"] = prompt
                    got = [c.get("text") for c in _by_index(self.request("/completions", payload).get("choices") or [])]
                if not got or any(not isinstance(g, str) for g in got):
                    raise ServerError(f"the server at {self.root} returned a completion without text.")
                texts += [cut_at_stop(g, stop) for g in got]
            return texts[:n]

        return self.parallel(one, list(prompts), desc, "prompt")


    def extract_json(self, conversations, schemas, max_tokens, desc="extract"):
        """`/v1/chat/completions` with `response_format` json_schema (strict), greedy."""
        def one(job: tuple[list[dict], dict]) -> str:
            conv, schema = job
            payload = {"model": self.name, "messages": conv, "max_tokens": max_tokens, "temperature": 0.0,
                       "response_format": {"type": "json_schema",
                                           "json_schema": {"name": "extraction", "schema": schema, "strict": True}}}
            choices = _by_index(self.request("/chat/completions", payload).get("choices") or [])
            text = (choices[0].get("message") or {}).get("content") if choices else None
            if not isinstance(text, str):
                raise ServerError(f"the server at {self.root} returned a chat completion without text.")
            return text

        return self.parallel(one, list(zip(conversations, schemas)), desc, "doc")


def parse_echo(resp: dict, prompt: str, url: str) -> list[tuple[int, str, float | None, dict | None]]:
    """Check an echo response really covers the prompt, then return its tokens with offsets."""
    choices = resp.get("choices") or []
    lp = choices[0].get("logprobs") if choices and isinstance(choices[0], dict) else None
    tokens = lp.get("tokens") if isinstance(lp, dict) else None
    values = lp.get("token_logprobs") if isinstance(lp, dict) else None
    refuse = NoPromptLogprobsError(
        f"the server at {url} returned no log-probabilities for the prompt tokens (echo=true, logprobs=1), "
        "so it cannot score log-likelihoods; use a server that supports echo or run in-process with --model DIR.")
    if not tokens or not values or len(tokens) != len(values):
        raise refuse
    offsets = _align(tokens, prompt, lp.get("text_offset"))
    tops = lp.get("top_logprobs") or [None] * len(tokens)
    rows = [(o, str(t), v, top) for o, t, v, top in zip(offsets, tokens, values, tops) if 0 <= o < len(prompt)]
    unscored = len(rows) > 1 and all(r[2] is None for r in rows[1:])
    if not rows or rows[-1][0] + len(rows[-1][1]) < len(prompt) or unscored:
        raise refuse  # logprobs only for generated tokens, or a prompt cut short
    return rows


def _align(tokens: list, prompt: str, server_offsets: list | None) -> list[int]:
    """Character offset of each token in `prompt`.

    Offsets are rebuilt from the token strings when they spell the prompt, which also absorbs
    a BOS token the server may echo in front of it; otherwise the server's `text_offset` is used.
    """
    starts, pos = [], 0
    for t in tokens:
        starts.append(pos)
        pos += len(str(t))
    shift = "".join(str(t) for t in tokens).find(prompt) if prompt else 0
    if shift >= 0:
        return [s - shift for s in starts]
    if server_offsets and len(server_offsets) == len(tokens):
        return [int(o) for o in server_offsets]
    return starts


def _by_index(choices: list) -> list[dict]:
    return sorted((c for c in choices if isinstance(c, dict)), key=lambda c: c.get("index", 0))


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read() or b"{}")
        err = body.get("error", body) if isinstance(body, dict) else body
        msg = err.get("message") if isinstance(err, dict) else err
        return str(msg or e.reason).strip().rstrip(".").replace("\n", " ")
    except (ValueError, OSError):
        return str(e.reason)


def _retry_after(e: urllib.error.HTTPError) -> float | None:
    try:
        return min(float(e.headers.get("retry-after", "")), 30.0)
    except (TypeError, ValueError):
        return None
