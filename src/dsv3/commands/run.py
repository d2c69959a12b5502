"""`dsv3 generate` and `dsv3 chat`: run a model from the command line; the model flags every runner shares."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from dsv3.errors import DSV3Error
from dsv3.io.encodings import split_reasoning

DTYPES = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
ADAPTER = "adapter"  # the engine's name for the one --lora adapter of generate/chat


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def model_dir(text: str) -> Path:
    """--model: a directory, or an embedded model's name (default | chat | long)."""
    from dsv3.errors import DSV3Error
    from dsv3.io.paths import model_path

    try:
        return model_path(text)
    except DSV3Error as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def port_number(text: str) -> int:
    """A TCP port, 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is outside 0-65535")
    return value


def check_bind(host: str, port: int, flag: str) -> None:
    """Bind (and release) host:port now, so a taken port or a bad host is one line before anything starts."""
    import socket

    if port == 0:
        return
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise DSV3Error(f"{flag} {port}: cannot bind {host}:{port}, an unknown host ({e.strerror})") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and torch's store do: TIME_WAIT is free
        try:
            s.bind(addr)
        except OSError as e:
            raise DSV3Error(f"{flag} {port}: cannot bind {host}:{port} ({e.strerror})") from None


def rope_scaling(text: str) -> dict:
    from dsv3.models.context_length import parse_rope_scaling

    try:
        return parse_rope_scaling(text)
    except DSV3Error as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--rope-scaling ")) from None


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where the model runs: cuda, cpu, or auto (default: CUDA when present); --dtype auto is bf16 on CUDA")


def resolve_device(name: str | None) -> str:
    """"cuda" or "cpu" for a --device value (auto: CUDA when present); a one-line error for CUDA without one."""
    import torch

    name = name or "auto"
    if name not in DEVICES and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise DSV3Error(f"--device {name}: use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DSV3Error(f"--device {name}: no CUDA device is available on this machine (use --device cpu, or auto)")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def device_dtype(dtype: str | None, device: str) -> str | None:
    """--dtype for the device: auto means bf16 on a GPU (the checkpoint's dtype, fp32 on a CPU, otherwise)."""
    return "bf16" if device.startswith("cuda") and dtype in (None, "auto") else dtype


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=model_dir, default=None, metavar="DIR|NAME",
                   help="checkpoint directory or embedded model: default | chat | long (default: default)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="weights/activations dtype (default: the checkpoint's; bf16 on CUDA)")
    add_device_arg(p)
    p.add_argument("--max-model-len", type=positive_int, default=None, help="longest prompt + output, in tokens")
    p.add_argument("--kv-cache-dtype", choices=("auto", "int8"), default="auto", help="latent cache storage (int8: per-token scales)")
    p.add_argument("--num-speculative-tokens", type=int, default=0, help="MTP draft tokens per step (0 = off)")
    p.add_argument("--spec-min-acceptance", type=float, default=0.3,
                   help="a request accepting fewer of its MTP drafts than this (after 32) stops drafting (0 = never)")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable automatic prefix caching")
    p.add_argument("--quantization", choices=("int8", "int4", "fp8", "awq", "gptq", "compressed-tensors"), default=None,  # dsv3.io.load.QUANTIZATION_CHOICES
                   help="int8/int4/fp8: quantize the weights on load; awq/gptq/compressed-tensors: the checkpoint holds that "
                        "packing (checked; such files, and `dsv3 quantize` output, also load without the flag)")
    p.add_argument("--tensor-parallel-size", type=positive_int, default=1, help="processes splitting attention heads and MLPs")
    p.add_argument("--expert-parallel-size", type=positive_int, default=1, help="processes splitting the routed experts")
    p.add_argument("--master-port", type=port_number, default=None, metavar="PORT",
                   help="rendezvous port of the ranks a parallel run spawns (default: a free port; torchrun sets its own)")
    p.add_argument("--rope-scaling", type=rope_scaling, default=None, metavar="SPEC",
                   help="YaRN context extension without editing config.json: "
                        "yarn:factor=4,original_max_position_embeddings=4096 or vLLM's JSON "
                        "'{\"rope_type\":\"yarn\",\"factor\":4.0,\"original_max_position_embeddings\":4096}'")


def resolve_model(args: argparse.Namespace, chat: bool = False) -> Path:
    """The model directory to load: --model or the embedded one, seen through --rope-scaling if given."""
    from dsv3.io.paths import default_model_dir

    model = args.model if args.model is not None else default_model_dir(chat=chat)
    if getattr(args, "rope_scaling", None) is not None:
        from dsv3.models.context_length import with_rope_scaling

        model = with_rope_scaling(model, args.rope_scaling)
    return model


def engine_config(args: argparse.Namespace, **extra):
    """EngineConfig from the shared model flags (validated before any model is loaded)."""
    from dsv3.engine import EngineConfig

    if args.num_speculative_tokens < 0:
        raise DSV3Error("--num-speculative-tokens must be >= 0")
    if not 0 <= args.spec_min_acceptance <= 1:
        raise DSV3Error(f"--spec-min-acceptance must be between 0 and 1, got {args.spec_min_acceptance}")
    return EngineConfig(max_model_len=args.max_model_len, kv_cache_dtype=args.kv_cache_dtype,
                        num_speculative_tokens=args.num_speculative_tokens,
                        spec_min_acceptance=args.spec_min_acceptance,
                        enable_prefix_caching=not args.no_prefix_caching, **extra)


def parallel_requested(args: argparse.Namespace) -> bool:
    from dsv3.parallel.dist import launched_by_torchrun

    return args.tensor_parallel_size * args.expert_parallel_size > 1 or launched_by_torchrun()


def start_parallel(args: argparse.Namespace, model, config):
    """Start the ranks (spawned here, or already launched by torchrun). None on a worker rank once it is done."""
    import atexit

    from dsv3.parallel.dist import launched_by_torchrun
    from dsv3.parallel.worker import start_engine

    if args.master_port is not None:
        if launched_by_torchrun():
            raise DSV3Error("--master-port is for the ranks dsv3 spawns itself; under torchrun give torchrun --master-port")
        check_bind("127.0.0.1", args.master_port, "--master-port")
    device = resolve_device(getattr(args, "device", "auto"))
    handle = start_engine(model, args.tensor_parallel_size, args.expert_parallel_size, dtype=device_dtype(args.dtype, device),
                          device=device, config=config, progress=False, port=args.master_port,
                          quantization=getattr(args, "quantization", None))
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
    from dsv3.engine.sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=args.stop)


def check_adapter(path: Path | None) -> None:
    """A `--lora` directory must hold a PEFT LoRA adapter (checked before the model loads)."""
    if path is None:
        return
    from dsv3.lora.peft_io import read_adapter_config

    if not path.is_dir():
        raise DSV3Error(f"--lora: adapter directory {path} does not exist")
    read_adapter_config(path)


def load(args: argparse.Namespace, chat: bool = False):
    """The LLM for generate/chat, or None on a worker rank of a parallel run (which has finished)."""
    from dsv3.llm import LLM

    lora = getattr(args, "lora", None)
    device = resolve_device(args.device)  # before anything loads: --device cuda without CUDA is one line
    check_adapter(lora)
    config = engine_config(args, lora_adapters={ADAPTER: str(lora)} if lora else None)
    model = resolve_model(args, chat=chat)
    if parallel_requested(args):
        if lora:
            raise DSV3Error("--lora cannot be combined with tensor or expert parallelism yet")
        handle = start_parallel(args, model, config)
        return None if handle is None else LLM.from_engine(handle.engine, model)
    return LLM(model, dtype=device_dtype(args.dtype, device), device=device, quantization=args.quantization,
               **dataclasses.asdict(config))


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt: the argument, --prompt-file FILE, or stdin ('-', or no prompt with stdin not a terminal)."""
    if args.prompt is not None and args.prompt_file is not None:
        raise DSV3Error("give the prompt as an argument or with --prompt-file, not both")
    source = args.prompt_file
    if source is None and args.prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise DSV3Error("no prompt: give it as an argument, with --prompt-file FILE, or on stdin")
        source = "-"
    elif source is None:
        source = "-" if args.prompt == "-" else None
    if source is None:
        text = args.prompt
    elif source == "-":
        text = sys.stdin.read()
    else:
        path = Path(source)
        if not path.is_file():
            raise DSV3Error(f"prompt file {source} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DSV3Error(f"prompt file {source} is not UTF-8 text") from None
    if not text:
        raise DSV3Error("the prompt is empty")
    return text


def run_generate(args: argparse.Namespace) -> int:
    params = sampling_params(args)  # validate flags before the (slow) model load
    prompt = read_prompt(args)
    llm = load(args)
    if llm is None:
        return 0
    for event in llm.stream(prompt, params, lora=ADAPTER if args.lora else None):
        sys.stdout.write(event.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def fit_conversation(llm, system: list[dict], history: list[dict], max_tokens: int,
                     **template_kwargs) -> tuple[list[int], int]:
    """Prompt ids of system + history, dropping the oldest turns (never the system prompt or the newest
    message) until the prompt leaves room for a reply of min(max_tokens, max_model_len / 2) tokens.

    Returns the ids and how many messages were dropped from `history` (in place).
    """
    limit = llm.engine.max_model_len
    room = min(max_tokens, limit // 2)
    dropped = 0
    while True:
        ids = llm.chat_prompt_ids(system + history, **template_kwargs)
        if len(ids) + room <= limit or len(history) <= 1:
            return ids, dropped
        n = 2 if len(history) > 2 and history[1]["role"] == "assistant" else 1  # a user turn and its reply
        del history[:n]
        dropped += n


def run_chat(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    llm = load(args, chat=True)
    if llm is None:
        return 0
    template_kwargs = {}
    if args.thinking:
        fmt = llm.tokenizer.chat_format
        if not fmt.thinking:
            raise DSV3Error(f"--thinking: this model's chat format ({fmt.name}) has no thinking mode "
                            "(DeepSeek-V3.1 and later have one)")
        template_kwargs["thinking"] = True
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    lora = ADAPTER if args.lora else None
    limit = llm.engine.max_model_len
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
        message = {"role": "user", "content": line}
        alone = len(llm.chat_prompt_ids(system + [message], **template_kwargs))
        if alone >= limit:  # refused before any turn is dropped: the conversation stays as it was
            print(f"dsv3: error: this message makes a {alone:,}-token prompt, more than max_model_len {limit:,}; "
                  "it was not sent (shorten it, or raise --max-model-len)", file=sys.stderr)
            continue
        history.append(message)
        ids, dropped = fit_conversation(llm, system, history, args.max_tokens, **template_kwargs)
        if dropped:
            print(f"(dropped the {dropped} oldest message{'s' if dropped > 1 else ''} to fit the {limit:,}-token context)",
                  file=sys.stderr)
        reply = []
        try:
            for event in llm.stream({"prompt_token_ids": ids}, params, lora=lora):
                reply.append(event.text)
                sys.stdout.write(event.text)
                sys.stdout.flush()
        except DSV3Error as e:  # this turn failed; the conversation goes on
            history.pop()
            print(f"\ndsv3: error: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        text = "".join(reply)
        if args.thinking:  # the reasoning goes back as reasoning_content: each format decides whether to show it again
            reasoning, answer = split_reasoning(text)
            history.append({"role": "assistant", "content": answer or "", "reasoning_content": reasoning})
        else:
            history.append({"role": "assistant", "content": text})


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="complete a prompt; prints only the generated text on stdout")
    add_model_args(g)
    add_sampling_args(g, max_tokens=128)
    g.add_argument("--lora", type=Path, default=None, metavar="DIR", help="apply a PEFT LoRA adapter")
    g.add_argument("--prompt-file", default=None, metavar="FILE",
                   help="read the prompt from FILE ('-' = stdin): for prompts too long for the command line")
    g.add_argument("prompt", nargs="?", default=None,
                   help="the text to continue ('-' or omitted: read stdin, unless it is a terminal)")
    g.set_defaults(func=run_generate)
    c = sub.add_parser("chat", help="multi-turn chat with streamed replies (/reset, /exit)")
    add_model_args(c)
    add_sampling_args(c, max_tokens=512)
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--thinking", action="store_true",
                   help="thinking mode: replies open with <think> (models whose chat format has one: V3.1 and later)")
    c.add_argument("--lora", type=Path, default=None, metavar="DIR", help="apply a PEFT LoRA adapter")
    c.set_defaults(func=run_chat)
