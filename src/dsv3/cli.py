"""The `dsv3` command: one sub-command per capability.

Each capability owns a small module exposing `register(subparsers)`, which adds its
sub-parser(s) and sets `func` to a callable taking the parsed namespace and returning an
exit code. This file only dispatches and turns user errors into one-line messages.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from dsv3.errors import DSV3Error

# Modules that contribute sub-commands, in the order they appear in `dsv3 --help`.
COMMAND_MODULES: tuple[str, ...] = (
    "dsv3.commands.run",
    "dsv3.commands.serve",
    "dsv3.commands.tokenizer",
    "dsv3.commands.data",
    "dsv3.commands.pretrain",
    "dsv3.commands.finetune",
    "dsv3.commands.merge",
    "dsv3.commands.quantize",
    "dsv3.commands.export",
    "dsv3.commands.eval",
    "dsv3.commands.plan",
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2, and flags are never abbreviated.

    With abbreviations allowed, `--prot 18308` would silently turn on `--protect-health-metrics`.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


class _StderrLog(logging.Handler):
    """Warnings on the command line as `dsv3: warning: ...` lines, written to whatever sys.stderr is now.

    `dsv3 serve` replaces it with its JSON log lines.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(f"dsv3: {record.levelname.lower()}: {record.getMessage()}\n")
            sys.stderr.flush()
        except Exception:  # a closed stream must not turn a warning into a crash
            pass


def _install_log_handler() -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _StderrLog) for h in root.handlers):
        root.addHandler(_StderrLog(logging.WARNING))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dsv3", description="DeepSeek-V3 models: run, serve, shrink, adapt, train, measure.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _install_log_handler()
    try:
        return int(args.func(args) or 0)
    except DSV3Error as e:
        print(f"dsv3: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dsv3: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the file system refused (permissions, a full disk, a vanished file): still one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"dsv3: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
