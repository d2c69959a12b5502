"""`dsv3 serve` (the OpenAI-compatible server) and `dsv3 audit verify` (check its audit log)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from dsv3.commands.run import (add_model_args, check_bind, device_dtype, engine_config, parallel_requested, port_number,
                               positive_int, resolve_device, resolve_model, start_parallel)
from dsv3.errors import DSV3Error


class ServeError(DSV3Error):
    """A `dsv3 serve` flag that cannot be honoured."""


class _JsonFormatter(logging.Formatter):
    """One JSON object per log line, so log shippers need no parsing rules."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def parse_lora(specs: list[str], served_name: str) -> dict[str, str]:
    """`--lora NAME=PATH` flags -> {name: adapter dir}, each checked to be a readable PEFT LoRA adapter."""
    from dsv3.lora.peft_io import read_adapter_config

    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ServeError(f"--lora {spec!r} must have the form NAME=PATH")
        if name in out or name == served_name:
            what = "given twice" if name in out else "the served model's own name"
            raise ServeError(f"--lora name {name!r} is {what}; each adapter needs its own name")
        if not Path(path).is_dir():
            raise ServeError(f"--lora {name}: adapter directory {path} does not exist")
        try:
            read_adapter_config(Path(path))
        except DSV3Error as e:
            raise ServeError(f"--lora {name}: {e}") from None
        out[name] = path
    return out


def served_name(args: argparse.Namespace) -> str:
    return args.served_model_name or (args.model.name if args.model else "dsv3")


def trusted_proxies(specs: list[str]) -> list:
    """`--trusted-proxy` values (addresses or CIDR networks) as ip_network objects."""
    import ipaddress

    out = []
    for spec in specs:
        try:
            out.append(ipaddress.ip_network(spec.strip(), strict=False))
        except ValueError:
            raise ServeError(f"--trusted-proxy {spec!r} is not an IP address or CIDR network (e.g. 10.0.0.0/8)") from None
    return out


def grammar_limits(args: argparse.Namespace):
    from dsv3.serve.structured import GrammarLimits

    if not args.grammar_timeout > 0:
        raise ServeError(f"--grammar-timeout must be a positive number of seconds, got {args.grammar_timeout}")
    return GrammarLimits(max_bytes=args.grammar_max_bytes, max_depth=args.grammar_max_depth, max_enum=args.grammar_max_enum,
                         max_repeat=args.grammar_max_repeat, timeout_s=args.grammar_timeout)


def build_config(args: argparse.Namespace):
    from dsv3.commands.outputs import prepare_output_file
    from dsv3.serve.audit import AuditLog, read_key
    from dsv3.serve.auth import APIKeys
    from dsv3.serve.cache import ResponseCache
    from dsv3.serve.ratelimit import RateLimit, RateLimiter
    from dsv3.serve.state import ServeConfig

    if (args.tls_certfile is None) != (args.tls_keyfile is None):
        raise ServeError("--tls-certfile and --tls-keyfile must be given together")
    for f in (args.tls_certfile, args.tls_keyfile):
        if f is not None and not Path(f).is_file():
            raise ServeError(f"TLS file {f} does not exist")
    for flag, path in (("--audit-log", args.audit_log), ("--response-cache", args.response_cache)):
        if path is not None and path != "memory":
            prepare_output_file(path, flag).parent.mkdir(parents=True, exist_ok=True)  # opened right below
    if args.quantization in ("int8", "int4") and parallel_requested(args):
        raise ServeError(f"--quantization {args.quantization} quantizes while loading, which parallel runs do not do: write a "
                         f"quantized checkpoint with `dsv3 quantize --method {args.quantization}` and serve that")
    lora = parse_lora(args.lora, served_name(args))
    if lora and parallel_requested(args):
        raise ServeError("--lora cannot be combined with tensor or expert parallelism yet")
    cache = None
    if args.response_cache is not None:
        cache = ResponseCache(None if args.response_cache == "memory" else args.response_cache,
                              max_entries=args.response_cache_size, ttl_s=args.response_cache_ttl)
    if args.audit_log_key is not None and args.audit_log is None:
        raise ServeError("--audit-log-key needs --audit-log")
    key = read_key(args.audit_log_key) if args.audit_log_key else None
    return ServeConfig(
        served_model_name=served_name(args), lora_names=list(lora),
        keys=APIKeys.build(args.api_key, args.api_key_file), protect_health_metrics=args.protect_health_metrics,
        max_body_bytes=args.max_body_bytes, rate_limiter=RateLimiter(RateLimit.parse(args.rate_limit)) if args.rate_limit else None,
        cache=cache, audit=AuditLog(args.audit_log, key) if args.audit_log else None, audit_content=args.audit_log_content,
        max_queue=args.max_queue, keepalive_s=args.keepalive, exit_on_engine_death=parallel_requested(args),
        exit_on_load_error=args.retry_load is None, grammar_limits=grammar_limits(args),
        trusted_proxies=trusted_proxies(args.trusted_proxy), embedding_pooling=args.embedding_pooling,
        responses_max_entries=args.responses_max_entries, responses_max_bytes=args.responses_max_mib << 20)


def loader(args: argparse.Namespace, lora: dict[str, str] | None = None, path: Path | None = None,
           stop: threading.Event | None = None):
    """The server's `load()`: engine and tokenizer of `path` (default: --model, or the embedded model).

    With --retry-load a failed load is logged and tried again every so many seconds until `stop` is set.
    """
    lora = parse_lora(args.lora, served_name(args)) if lora is None else lora

    def load():
        while True:
            try:
                return load_once()
            except Exception as e:
                if args.retry_load is None or (stop is not None and stop.is_set()):
                    raise
                logging.getLogger("dsv3.serve").error("model load failed (%s: %s); retrying in %g s", type(e).__name__,
                                                      first_line(e), args.retry_load)
                if stop is not None and stop.wait(args.retry_load):
                    raise

    def load_once():
        from dsv3.io.load import load_for_inference
        from dsv3.engine import LLMEngine
        from dsv3.io.tokenizer import Tokenizer

        nonlocal path
        path = path if path is not None else resolve_model(args)
        if parallel_requested(args):
            cfg = engine_config(args, max_num_seqs=args.max_num_seqs, kv_cache_memory=args.kv_cache_memory << 20, seed=args.seed)
            handle = start_parallel(args, path, cfg)
            return handle.engine, handle.engine.tokenizer
        device = resolve_device(args.device)
        model = load_for_inference(path, dtype=device_dtype(args.dtype, device), quantization=args.quantization,
                                   device=device)
        tok = Tokenizer.from_dir(path)
        cfg = engine_config(args, max_num_seqs=args.max_num_seqs, kv_cache_memory=args.kv_cache_memory << 20, seed=args.seed,
                            lora_adapters=lora or None)
        return LLMEngine(model, tok, cfg), tok
    return load


def run_serve(args: argparse.Namespace) -> int:
    import os

    import uvicorn

    from dsv3.parallel.dist import launched_by_torchrun
    from dsv3.serve.app import create_app

    if launched_by_torchrun() and int(os.environ.get("RANK", "0")) != 0:  # worker rank: serve the model, not HTTP
        start_parallel(args, resolve_model(args), engine_config(args, max_num_seqs=args.max_num_seqs, seed=args.seed))
        return 0

    config = build_config(args)
    resolve_device(args.device)  # --device cuda without CUDA: one line, before the server starts
    check_bind(args.host, args.port, "--port")
    path = resolve_model(args)
    if args.retry_load is None:
        check_model(path)  # the common mistakes (no such model, no weights) fail here, before the server starts
        from dsv3.io.load import DECLARED, check_declared

        if args.quantization in DECLARED:  # `--quantization awq` on files that are not AWQ: one line, before starting
            check_declared(path, args.quantization)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    stop = threading.Event()
    app = create_app(config, loader(args, path=path, stop=stop))
    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown; a no-op handler makes that a clean exit 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        # proxy_headers=False: uvicorn would otherwise trust X-Forwarded-For from 127.0.0.1; the gate reads it only
        # from --trusted-proxy peers
        uvicorn.run(app, host=args.host, port=args.port, ssl_certfile=args.tls_certfile, ssl_keyfile=args.tls_keyfile,
                    timeout_graceful_shutdown=args.grace_period, log_config=None, access_log=False, proxy_headers=False)
    finally:
        stop.set()
    state = app.state  # create_app makes the ServerState the app state
    if state.load_error is not None:  # without --retry-load the server stopped at once (ServeConfig.exit_on_load_error)
        print(f"dsv3: error: the model failed to load: {first_line(state.load_error)}", file=sys.stderr)
        return 2
    front = state.front
    if front is not None and front.errored is not None:
        print(f"dsv3: error: the engine stopped: {front.errored}", file=sys.stderr)
        return 1
    return 0


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_model(path: Path) -> None:
    """A model directory has a valid config.json and safetensors weights (cheap; the load checks the rest)."""
    from dsv3.io.checkpoint import checkpoint_files
    from dsv3.config import ModelConfig

    ModelConfig.from_dir(path)
    checkpoint_files(Path(path))


def run_audit_verify(args: argparse.Namespace) -> int:
    from dsv3.serve.audit import read_key, verify

    r = verify(args.path, read_key(args.key) if getattr(args, "key", None) else None)
    if r.ok:
        keyed = f", HMAC from line {r.keyed_from}" if r.keyed_from else ""
        print(f"{args.path}: OK, {r.lines} lines, chain intact{keyed}")
        return 0
    where = f"line {r.bad_line}" if r.bad_line else "log"
    print(f"{args.path}: {where}: {r.reason}")
    return 1


def run_audit_repair(args: argparse.Namespace) -> int:
    from dsv3.serve.audit import AuditError, read_key, repair

    if not Path(args.path).is_file():
        raise AuditError(f"audit log {args.path} does not exist")

    r = repair(args.path, read_key(args.key) if args.key else None)
    if r is None:
        print(f"{args.path}: no torn line; nothing to repair")
    else:
        print(f"{args.path}: moved a torn last line ({r.torn_bytes} bytes, sha256 {r.torn_sha256[:16]}...) to "
              f"{r.moved_to}; the chain continues with an audit_repair record")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, metrics, audit log)")
    add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=port_number, default=8000)
    s.add_argument("--served-model-name", default=None, help="model id clients send (default: the directory name)")
    s.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="serve a PEFT LoRA adapter under NAME (repeatable); a request's 'model' picks it")
    s.add_argument("--max-num-seqs", type=positive_int, default=64, help="sequences batched at once")
    s.add_argument("--kv-cache-memory", type=positive_int, default=1024, help="latent cache size in MiB")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--api-key", action="append", default=[], help="accepted API key (repeatable)")
    s.add_argument("--api-key-file", default=None, help="file of '[id:]sha256hex' lines (hashed keys)")
    s.add_argument("--protect-health-metrics", action="store_true", help="require a key on /health and /metrics too")
    s.add_argument("--tls-certfile", default=None)
    s.add_argument("--tls-keyfile", default=None)
    s.add_argument("--audit-log", default=None, metavar="PATH", help="hash-chained JSONL audit log")
    s.add_argument("--audit-log-content", action="store_true", help="also store request bodies in the audit log")
    s.add_argument("--audit-log-key", default=None, metavar="FILE",
                   help="HMAC key file for the audit chain (forged or re-chained lines then fail `audit verify --key`)")
    s.add_argument("--trusted-proxy", action="append", default=[], metavar="CIDR",
                   help="read X-Forwarded-For only from these peers (repeatable; default: never)")
    g = s.add_argument_group("grammar limits (response_format, forced tool calls): over a limit is a 400")
    g.add_argument("--grammar-max-bytes", type=positive_int, default=64 << 10, help="schema size as compact JSON")
    g.add_argument("--grammar-max-depth", type=positive_int, default=64, help="schema nesting (objects and arrays)")
    g.add_argument("--grammar-max-enum", type=positive_int, default=2048, help="enum/const values in one schema")
    g.add_argument("--grammar-max-repeat", type=positive_int, default=1000,
                   help="regex counted repetition ({m,n}, nested counts multiplied)")
    g.add_argument("--grammar-timeout", type=float, default=10.0, help="seconds one compile may take")
    s.add_argument("--rate-limit", default=None, metavar="RPM[,TPM]", help="per-key requests (and tokens) per minute")
    s.add_argument("--response-cache", default=None, metavar="PATH|memory", help="hot-answer cache (SQLite file or 'memory')")
    s.add_argument("--response-cache-size", type=positive_int, default=1024, help="in-memory entries")
    s.add_argument("--response-cache-ttl", type=float, default=3600.0, help="seconds an answer stays valid")
    s.add_argument("--max-queue", type=positive_int, default=256, help="concurrent requests before 503")
    s.add_argument("--max-body-bytes", type=positive_int, default=4 << 20)
    s.add_argument("--embedding-pooling", choices=["mean", "last"], default="mean",
                   help="/v1/embeddings: average the final hidden states, or take the last token's")
    s.add_argument("--responses-max-entries", type=positive_int, default=1000,
                   help="/v1/responses kept for previous_response_id (least recently used out first)")
    s.add_argument("--responses-max-mib", type=positive_int, default=64, help="... and their size, all together")
    s.add_argument("--keepalive", type=float, default=15.0, help="seconds between SSE keep-alive comments")
    s.add_argument("--grace-period", type=positive_int, default=30, help="seconds to finish in-flight work on SIGTERM")
    s.add_argument("--retry-load", type=float, default=None, metavar="SECONDS",
                   help="if the model fails to load, keep serving 503 and retry every SECONDS "
                        "(default: exit 2 at once with the reason)")
    s.set_defaults(func=run_serve)

    a = sub.add_parser("audit", help="check a serve audit log")
    asub = a.add_subparsers(dest="audit_command", metavar="ACTION", parser_class=type(a))
    asub.required = True
    v = asub.add_parser("verify", help="report the first altered, removed or reordered line")
    v.add_argument("path")
    v.add_argument("--key", default=None, metavar="FILE", help="the log's HMAC key file (--audit-log-key)")
    v.set_defaults(func=run_audit_verify)
    r = asub.add_parser("repair", help="move a torn last line (a crash mid-write) aside and continue the chain")
    r.add_argument("path")
    r.add_argument("--key", default=None, metavar="FILE", help="the log's HMAC key file, if it is keyed")
    r.set_defaults(func=run_audit_repair)
