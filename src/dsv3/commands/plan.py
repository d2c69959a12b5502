"""`dsv3 plan`: will this model fit on my hardware? Weights, latent cache and activations per device."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dsv3.commands import plan_k8s
from dsv3.errors import ConfigError, DSV3Error

# DeepSeek-V3/R1 671B (the hub config.json), so the arithmetic needs no download.
V3_671B = {
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128, "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 3, "max_position_embeddings": 163840, "num_nextn_predict_layers": 1, "torch_dtype": "bfloat16",
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
}
PRESETS = {"deepseek-v3": V3_671B, "deepseek-r1": V3_671B}
DEVICE_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128)


def load_config(text: str):
    """A checkpoint directory, a config.json file, or a preset name."""
    from dsv3.config import ModelConfig

    if text in PRESETS:
        return ModelConfig.from_dict(PRESETS[text])
    path = Path(text)
    if path.is_dir():
        return ModelConfig.from_dir(path)
    if path.is_file():
        try:
            return ModelConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
    raise ConfigError(f"--model {text!r} is neither a checkpoint directory, a config.json, nor one of {', '.join(PRESETS)}")


def checkpoint_quantization(cfg) -> str:
    """How a checkpoint's weights sit in memory once dsv3 loads them (DeepSeek's FP8 release is dequantized)."""
    qc = cfg.quantization_config or {}
    if qc.get("quant_method") == "dsv3":
        return "awq" if qc.get("calibration") == "awq" else str(qc.get("format", "none"))
    return "none"


def _dtype(args: argparse.Namespace, cfg) -> str:
    if args.dtype != "auto":
        return args.dtype
    return {"float32": "fp32", "float16": "fp16"}.get(str(cfg.torch_dtype), "bf16")


def run_plan(args: argparse.Namespace) -> int:
    from dsv3.parallel.dist import ParallelError
    from dsv3.parallel.sizing import RESERVE, gib, plan

    if args.device_memory is not None and args.device_memory <= 0:
        raise DSV3Error(f"--device-memory must be a positive number of GiB, got {args.device_memory}")
    emit = args.emit == "k8s"
    if emit:
        plan_k8s.check(args)
    cfg = load_config(args.model)
    quant = args.quantization or checkpoint_quantization(cfg)
    dtype = "fp32" if emit and args.target == "cpu" and args.dtype == "auto" else _dtype(args, cfg)  # as serve on a CPU
    opts = dict(quantization=quant, dtype=dtype, max_model_len=args.max_model_len,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                kv_cache_dtype=args.kv_cache_dtype, with_mtp=not args.no_mtp)
    p = plan(cfg, args.devices, **opts)
    lines = [f"model: {args.model} · weights {quant if quant != 'none' else dtype}"
             f" · {args.devices} device(s) (TP={args.devices}, experts split {args.devices} ways)",
             f"  weights per device        {gib(p.weights):>14}",
             f"  latent cache per token    {p.cache_per_token / 1024:>10,.1f} KiB   (every device; MLA latents are shared by all heads)",
             f"  cache per sequence        {gib(p.per_sequence):>14}   ({p.max_model_len:,} tokens)",
             f"  activations (est. peak)   {gib(p.activations):>14}   ({min(args.max_num_batched_tokens, p.max_model_len):,}-token step)",
             f"  reserve                   {gib(RESERVE):>14}",
             f"  needed for {p.max_num_seqs} sequences   {gib(p.needed()):>14} per device"]
    code, seqs = 0, p.max_num_seqs
    if args.device_memory is not None:
        mem = int(args.device_memory * 2**30)
        n = p.sequences_that_fit(mem)
        if n >= p.max_num_seqs:
            lines.append(f"fits: {n:,} sequences of {p.max_model_len:,} tokens fit in {args.device_memory:g} GiB per device")
        elif n > 0:
            lines.append(f"fits partly: only {n:,} of {p.max_num_seqs} sequences of {p.max_model_len:,} tokens fit in "
                         f"{args.device_memory:g} GiB per device")
            seqs = n
        else:
            code = 1
            lines.append(f"does not fit: {gib(p.fixed())} per device before any cache, {args.device_memory:g} GiB available")
            for d in DEVICE_COUNTS:
                if d <= args.devices:
                    continue
                try:
                    if plan(cfg, d, **opts).sequences_that_fit(mem) >= 1:
                        lines.append(f"smallest device count that fits one sequence: {d}")
                        break
                except ParallelError:
                    continue
    if not emit:
        print("\n".join(lines))
        return code
    if code:
        print("\n".join(lines), file=sys.stderr)
        print("dsv3: error: the model does not fit; no manifests written", file=sys.stderr)
        return 1
    if seqs < p.max_num_seqs:
        p = plan(cfg, args.devices, **{**opts, "max_num_seqs": seqs})
        lines.append(f"manifests size the server for the {seqs:,} sequences that fit (--max-num-seqs {seqs})")
    command = plan_k8s.command_line(args, args.parser)
    sys.stdout.write(plan_k8s.patch(args, p, cfg, dtype, seqs, [f"Generated by: {command}", *lines]))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from dsv3.commands.run import positive_int
    from dsv3.parallel.sizing import QUANTIZATIONS

    p = sub.add_parser("plan", help="memory per device: weights, latent cache, activations; does it fit?")
    p.add_argument("--model", required=True, help=f"checkpoint directory, config.json, or {' | '.join(PRESETS)}")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                   help="weight format of the linears (none = --dtype; default: as the checkpoint loads)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto", help="activations, cache and unquantized weights")
    p.add_argument("--max-model-len", type=positive_int, default=None, help="tokens per sequence (default: the model's maximum)")
    p.add_argument("--max-num-seqs", type=positive_int, default=64, help="concurrent sequences wanted")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=2048, help="tokens per engine step")
    p.add_argument("--kv-cache-dtype", choices=("auto", "int8"), default="auto")
    p.add_argument("--devices", type=positive_int, default=1, help="GPUs (ranks) the model is split over")
    p.add_argument("--device-memory", type=float, default=None, metavar="GB", help="memory per device in GiB (enables the verdict)")
    p.add_argument("--no-mtp", action="store_true", help="leave out the MTP module (no speculative decoding)")
    plan_k8s.add_args(p)
    p.set_defaults(func=run_plan, parser=p)
