"""Build the native kernels ahead of time, for declared x86-64 levels, into a directory.

A container image's builder stage runs this (it has the compiler; the runtime image has none) and
the runtime image sets DSV3_KERNELS_PREBUILT to the directory: `dsv3.kernels` then loads the most
capable library the CPU it lands on can run, or falls back to PyTorch ops. `-march=native` would
tie the library to the build machine's CPU, which is rarely the one that serves.

    python -m dsv3.kernels.prebuild OUT_DIR x86-64-v4 x86-64-v3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsv3.kernels import BASE_FLAGS, X86_LEVELS, compile_library, compilers, prebuilt_name


def prebuild(out: Path, levels: list[str], cc: str, cxx: str) -> list[Path]:
    """Compile one library per level into `out`; the paths written (raises RuntimeError on a failed build)."""
    written = []
    for level in levels:
        so = out / prebuilt_name(level)
        err = compile_library(cc, cxx, (*BASE_FLAGS, f"-march={level}", "-mtune=generic"), so)
        if err is not None:
            raise RuntimeError(f"building the kernels for {level} failed: {err}")
        written.append(so)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv3.kernels.prebuild", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="directory for the libraries (DSV3_KERNELS_PREBUILT at run time)")
    p.add_argument("levels", nargs="+", choices=sorted(X86_LEVELS), help="x86-64 micro-architecture levels")
    args = p.parse_args(argv)
    tools = compilers()
    if tools is None:
        print("dsv3: error: no C and C++ compiler (set CC and CXX)", file=sys.stderr)
        return 2
    try:
        for so in prebuild(args.out, args.levels, *tools):
            print(so)
    except RuntimeError as e:
        print(f"dsv3: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
