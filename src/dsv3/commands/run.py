"""`dsv3 generate` and `dsv3 chat`: run a model from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from dsv3.errors import DSV3Error

DTYPES = ("auto", "fp32", "bf16", "fp16")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def model_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"model directory {text!r} does not exist")
    return path


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=model_dir, default=None, help="checkpoint directory (default: the embedded model)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="weights/activations dtype (default: the checkpoint's)")
    p.add_argument("--max-model-len", type=positive_int, default=None, help="longest prompt + output, in tokens")
    p.add_argument("--kv-cache-dtype", choices=("auto", "int8"), default="auto", help="latent cache storage (int8: per-token scales)")
    p.add_argument("--num-speculative-tokens", type=int, default=0, help="MTP draft tokens per step (0 = off)")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable automatic prefix caching")
    p.add_argument("--quantization", choices=("int8", "int4", "fp8"), default=None,
                   help="quantize the weights on load (a `dsv3 quantize` checkpoint needs no flag)")
    p.add_argument("--tensor-parallel-size", type=positive_int, default=1, help="processes splitting attention heads and MLPs")
    p.add_argument("--expert-parallel-size", type=positive_int, default=1, help="processes splitting the routed experts")


def engine_config(args: argparse.Namespace, **extra):
    """EngineConfig from the shared model flags (validated before any model is loaded)."""
    from dsv3.engine import EngineConfig

    if args.num_speculative_tokens < 0:
        raise DSV3Error("--num-speculative-tokens must be >= 0")
    return EngineConfig(max_model_len=args.max_model_len, kv_cache_dtype=args.kv_cache_dtype,
                        num_speculative_tokens=args.num_speculative_tokens,
                        enable_prefix_caching=not args.no_prefix_caching, **extra)


def parallel_requested(args: argparse.Namespace) -> bool:
    from dsv3.parallel.dist import launched_by_torchrun

    return args.tensor_parallel_size * args.expert_parallel_size > 1 or launched_by_torchrun()


def start_parallel(args: argparse.Namespace, model, config):
    """Start the ranks (spawned here, or already launched by torchrun). None on a worker rank once it is done."""
    import atexit

    from dsv3.parallel.worker import start_engine

    handle = start_engine(model, args.tensor_parallel_size, args.expert_parallel_size, dtype=args.dtype, config=config,
                          progress=False)
    if handle is not None:
        atexit.register(handle.shutdown)
    return handle


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=positive_int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def sampling_params(args: argparse.Namespace):
    from dsv3.sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=args.stop)


def load(args: argparse.Namespace, chat: bool = False):
    """The LLM for generate/chat, or None on a worker rank of a parallel run (which has finished)."""
    from dsv3.llm import LLM
    from dsv3.paths import default_model_dir

    model = args.model if args.model is not None else default_model_dir(chat=chat)
    config = engine_config(args)
    if parallel_requested(args):
        if args.quantization is not None:
            raise DSV3Error("--quantization cannot be combined with tensor or expert parallelism yet")
        handle = start_parallel(args, model, config)
        return None if handle is None else LLM.from_engine(handle.engine, model)
    return LLM(model, dtype=args.dtype, quantization=args.quantization, **dataclasses.asdict(config))


def run_generate(args: argparse.Namespace) -> int:
    params = sampling_params(args)  # validate flags before the (slow) model load
    llm = load(args)
    if llm is None:
        return 0
    for event in llm.stream(args.prompt, params):
        sys.stdout.write(event.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def run_chat(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    llm = load(args, chat=True)
    if llm is None:
        return 0
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    print("dsv3 chat — /reset clears the conversation, /exit quits", file=sys.stderr)
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            history.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = llm.chat_prompt_ids(system + history)
        reply = []
        for event in llm.stream({"prompt_token_ids": ids}, params):
            reply.append(event.text)
            sys.stdout.write(event.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply)})


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="complete a prompt; prints only the generated text on stdout")
    add_model_args(g)
    add_sampling_args(g, max_tokens=128)
    g.add_argument("prompt", help="the text to continue")
    g.set_defaults(func=run_generate)
    c = sub.add_parser("chat", help="multi-turn chat with streamed replies (/reset, /exit)")
    add_model_args(c)
    add_sampling_args(c, max_tokens=512)
    c.add_argument("--system", default=None, help="system prompt")
    c.set_defaults(func=run_chat)
