"""Where dsv3 finds things it ships: the embedded default model and its chat-tuned variant."""

from __future__ import annotations

import os
from pathlib import Path

from dsv3.errors import DSV3Error

PACKAGE_DATA = Path(__file__).parents[1] / "data"


def default_chat_model_dir() -> Path | None:
    """The chat-tuned variant (`DSV3_DEFAULT_CHAT_MODEL` overrides it), or None when none is shipped.

    An override naming a directory without a model is a user error; a missing shipped variant is not,
    since the base model still answers chat requests. The shipped variant belongs to the shipped base
    model, so a `DSV3_DEFAULT_MODEL` override alone makes chat use that model instead.
    """
    override = os.environ.get("DSV3_DEFAULT_CHAT_MODEL")
    if override:
        if not (Path(override) / "config.json").is_file():
            raise DSV3Error(f"DSV3_DEFAULT_CHAT_MODEL={override} holds no model (no config.json); fix or unset it")
        return Path(override)
    if os.environ.get("DSV3_DEFAULT_MODEL"):
        return None
    path = PACKAGE_DATA / "default-chat"
    return path if (path / "config.json").is_file() else None


def default_model_dir(chat: bool = False) -> Path:
    """The embedded default model; with `chat`, its chat-tuned variant when one exists, else the base model.

    `DSV3_DEFAULT_MODEL` overrides the base model, `DSV3_DEFAULT_CHAT_MODEL` the chat variant.
    """
    if chat:
        path = default_chat_model_dir()
        if path is not None:
            return path
    override = os.environ.get("DSV3_DEFAULT_MODEL")
    path = Path(override) if override else PACKAGE_DATA / "default"
    if not (path / "config.json").is_file():
        raise DSV3Error(f"the embedded default model is not present at {path}; pass --model DIR")
    return path
