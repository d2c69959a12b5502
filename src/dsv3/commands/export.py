"""`dsv3 export gguf`: write a checkpoint as one GGUF file that llama.cpp (and llama-cpp-python, Ollama, LM Studio) runs."""

from __future__ import annotations

import argparse
import sys

from dsv3.commands.run import model_dir


def run_export_gguf(args: argparse.Namespace) -> int:
    from dsv3.commands.outputs import prepare_output_file
    from dsv3.io.gguf import export_gguf

    out = prepare_output_file(args.output)
    path = export_gguf(args.model, out, args.type)
    print(f"gguf {args.type}: wrote {path} ({path.stat().st_size / 2**20:.2f} MiB)", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to another runtime's format (gguf)")
    fmts = p.add_subparsers(dest="format", metavar="FORMAT", parser_class=type(p))
    fmts.required = True
    g = fmts.add_parser("gguf", help="one GGUF file for llama.cpp (architecture deepseek2)")
    g.add_argument("--model", required=True, type=model_dir, help="checkpoint directory (full precision or FP8)")
    g.add_argument("-o", "--output", required=True, help="the .gguf file to write (replaced if it exists)")
    g.add_argument("--type", choices=("f16", "q8_0", "f32"), default="f16",
                   help="matrix type: f16, q8_0 (llama.cpp's 8-bit blocks of 32) or f32; norms and the router stay f32")
    g.set_defaults(func=run_export_gguf)
