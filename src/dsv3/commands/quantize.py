"""`dsv3 quantize`: write an int8 / int4 / AWQ / FP8 checkpoint that `dsv3 generate --model OUT` loads."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsv3.commands.run import add_device_arg, device_dtype, model_dir, positive_int, resolve_device

METHODS = ("int8", "int4", "awq", "fp8")
ON_THE_FLY = ("int8", "int4", "fp8")


def calibration_ids(path: Path, tokenizer, n_samples: int, seq_len: int):
    """Token blocks [n, seq_len] cut from a text file (the last block may be shorter if the text is short)."""
    import torch

    from dsv3.quant.schemes import QuantError

    if not path.is_file():
        raise QuantError(f"calibration file {str(path)!r} does not exist")
    ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)
    if len(ids) < 16:
        raise QuantError(f"calibration file {str(path)!r} has only {len(ids)} tokens; AWQ needs at least 16")
    seq_len = min(seq_len, len(ids))
    n = min(n_samples, len(ids) // seq_len)
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def existing_quantization(cfg) -> str | None:
    """The format of a `dsv3 quantize` checkpoint (int8, int4, awq, fp8), or None for full-precision weights.

    DeepSeek's own FP8 release is not counted: it is dequantized on load and may be quantized again.
    """
    from dsv3.commands.plan import checkpoint_quantization

    return checkpoint_quantization(cfg) if (cfg.quantization_config or {}).get("quant_method") == "dsv3" else None


def run_quantize(args: argparse.Namespace) -> int:
    from dsv3.io.load import load_model
    from dsv3.config import ModelConfig
    from dsv3.commands.outputs import prepare_output_dir
    from dsv3.quant import quantize_model, save_quantized
    from dsv3.quant.apply import check_embedding, default_policy, linear_weight_bytes
    from dsv3.quant.schemes import QuantError, check_group_size
    from dsv3.io.tokenizer import Tokenizer
    from dsv3.models.registry import family

    device = resolve_device(args.device)
    check_group_size(args.group_size)
    head, embedding = default_policy(args.method)
    if args.lm_head is not None and args.keep_lm_head:
        raise QuantError("--lm-head and --keep-lm-head contradict each other; give one")
    head = False if args.keep_lm_head else head if args.lm_head is None else args.lm_head
    if args.embedding is not None and args.keep_embedding:
        raise QuantError("--embedding and --keep-embedding contradict each other; give one")
    embedding = check_embedding(args.method, False if args.keep_embedding else args.embedding or embedding)
    if args.method == "awq" and args.calib is None:
        raise QuantError("--method awq needs calibration text: pass --calib FILE")
    if args.calib is not None and not Path(args.calib).is_file():
        raise QuantError(f"calibration file {args.calib!r} does not exist")
    if Path(args.output).resolve() == Path(args.model).resolve():
        raise QuantError(f"output directory {args.output!r} is the input model directory; choose another -o")
    source = ModelConfig.from_dir(args.model)
    family(source.model_type).refuse("quantization")  # before anything loads or is written
    already = existing_quantization(source)
    if already is not None:
        raise QuantError(f"{args.model} is already quantized ({already}, by dsv3 quantize); quantize the "
                         "full-precision checkpoint it was made from instead")
    prepare_output_dir(args.output, overwrite=args.overwrite)
    model = load_model(args.model, dtype=device_dtype(args.dtype, device), device=device, progress=True)
    calib = None
    if args.method == "awq":
        calib = calibration_ids(Path(args.calib), Tokenizer.from_dir(args.model), args.calib_samples, args.calib_seq_len)
    before = linear_weight_bytes(model)
    quantize_model(model, args.method, group_size=args.group_size, zero_point=not args.symmetric, calib=calib,
                   include_lm_head=head, embedding=embedding, progress=True)
    after = linear_weight_bytes(model)
    out = save_quantized(model, args.output, tokenizer_from=args.model)
    size_in, size_out = weight_bytes(Path(args.model)), weight_bytes(out)
    forced = getattr(model, "awq_forced_experts", {})
    if forced:
        print(f"note: {sum(map(len, forced.values()))} expert(s) got no calibration tokens; calibrated with forced routing",
              file=sys.stderr)
    print(f"{args.method}: linear weights {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB ({after / before:.3f}x); "
          f"weight files {size_in / 2**20:.2f} MiB -> {size_out / 2**20:.2f} MiB ({size_out / size_in:.3f}x); wrote {out}",
          file=sys.stderr)
    return 0


def weight_bytes(model_dir: Path) -> int:
    """Bytes of a checkpoint directory's safetensors files."""
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a checkpoint (int8, int4, awq, fp8) and save it")
    p.add_argument("--method", required=True, choices=METHODS, help="int8: per-channel; int4: group RTN; awq: int4 + AWQ; fp8: e4m3 128x128 blocks")
    p.add_argument("--model", required=True, type=model_dir, help="input checkpoint directory")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    p.add_argument("--calib", default=None, help="calibration text file (required for awq)")
    p.add_argument("--group-size", type=positive_int, default=128, help="int4/awq input channels per scale (32, 64, 128, 256)")
    p.add_argument("--symmetric", action="store_true", help="int4/awq without zero points")
    p.add_argument("--lm-head", nargs="?", const=True, default=None, choices=(True, "int8"), metavar="FORMAT",  # dsv3.quant.apply.HEAD_FORMATS
                   help="the LM head's format: the method's (no FORMAT) or int8 (default: int8 beside int4/awq layers, "
                        "as llama.cpp's Q4_K_M keeps its output matrix at 6 bits; the method's format otherwise)")
    p.add_argument("--keep-lm-head", action="store_true", help="store the LM head unquantized (bf16)")
    p.add_argument("--keep-embedding", action="store_true",
                   help="store the token embedding unquantized (bf16); by default it is quantized like the layers "
                        "(int8, or int4 for int4/awq; fp8 files keep DeepSeek's bf16 embedding)")
    p.add_argument("--embedding", choices=("int8", "int4"), default=None,
                   help="the token embedding's format (default: the method's; int8 is also accepted beside int4/awq "
                        "layers, at a larger file)")
    p.add_argument("--calib-samples", type=positive_int, default=32, help="calibration sequences (awq)")
    p.add_argument("--calib-seq-len", type=positive_int, default=256, help="tokens per calibration sequence (awq)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto", help="activation dtype of the result")
    add_device_arg(p)
    p.set_defaults(func=run_quantize)
