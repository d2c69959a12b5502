"""Checking where a command will write, before it spends minutes on work it could not save.

Every command that writes checks its output up front: a directory output must not be an existing
file, must be creatable and writable, and must be empty unless the user passed `--overwrite` (so a
re-run never mixes a new result with an old one's leftovers); a file output must not be an existing
directory and its folder must be creatable and writable. Each failure is one `OutputError` sentence.
"""

from __future__ import annotations

import os
from pathlib import Path

from dsv3.errors import DSV3Error


class OutputError(DSV3Error):
    """An output path that cannot be written, or that holds an earlier result the user did not ask to replace."""


def _check_writable_dir(path: Path, what: str) -> None:
    """Directory `path` exists and is writable, or could be created: its nearest existing ancestor is a
    writable directory. Nothing is created, so a command that fails on another input leaves no trace.

    `what` names the path in messages, e.g. "-o out" or "-o out/x.json: its folder out".
    """
    p = path
    while not p.exists() and not p.is_symlink() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise OutputError(f"{what} cannot be created: {p} is an existing file, not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise OutputError(f"{what} " + ("is not writable" if p == path else f"cannot be created: {p} is not writable"))


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and next(path.iterdir(), None) is None


def prepare_output_dir(path: str | Path, overwrite: bool = False, flag: str = "-o", hint: str = "") -> Path:
    """Check an output directory: writable or creatable, and empty unless `overwrite`.

    `hint` is added to the "not empty" message (e.g. how to resume instead).
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{flag} {p} is an existing file; give a directory")
    if p.is_dir() and not overwrite and not is_empty_dir(p):
        raise OutputError(f"{flag} {p} already exists and is not empty; pass --overwrite to write over it{hint}, "
                          "or choose another directory")
    _check_writable_dir(p, f"{flag} {p}")
    return p


def prepare_output_file(path: str | Path, flag: str = "-o") -> Path:
    """Check a file output: not a directory, in a folder that is writable or can be created.

    An existing file is replaced, as `-o` of compilers and downloaders does.
    """
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{flag} {p} is an existing directory; give a file name")
    _check_writable_dir(p.parent, f"{flag} {p}: its folder {p.parent}")
    if p.exists() and not os.access(p, os.W_OK):
        raise OutputError(f"{flag} {p} is not writable")
    return p
