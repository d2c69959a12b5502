"""Where dsv3 finds things it ships: the embedded models, by directory or by name.

Three models ship in the package: `default` (V3 architecture, code), `chat` (its chat-tuned variant) and
`long` (V4 architecture: sliding window + compressed sparse attention, trained on long documents). Every
`--model` and `LLM(model)` takes a directory or one of these names; a directory of the same name wins, the
way a local path shadows a hub id in transformers.
"""

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


EMBEDDED = {"default": "default", "chat": "default-chat", "long": "default-long"}  # name -> directory in PACKAGE_DATA


def embedded_name(text: str | Path) -> str | None:
    """The shipped model `text` names (a name, or its directory's name: default-chat, default-long), else None."""
    text = str(text)
    return text if text in EMBEDDED else next((k for k, d in EMBEDDED.items() if d == text), None)


def embedded_model_dir(name: str) -> Path:
    """The shipped model called `name` (default | chat | long, or its directory name default-chat | default-long)."""
    key = embedded_name(name)
    if key is None:
        raise DSV3Error(f"no embedded model named {name!r} (embedded: {', '.join(EMBEDDED)})")
    if key in ("default", "chat"):  # these two follow DSV3_DEFAULT_MODEL / DSV3_DEFAULT_CHAT_MODEL
        return default_model_dir(chat=key == "chat")
    path = PACKAGE_DATA / EMBEDDED[key]
    if not (path / "config.json").is_file():
        raise DSV3Error(f"the embedded {key!r} model is not present at {path}; build it with `make default-{key}`")
    return path


def model_path(text: str | Path) -> Path:
    """A model directory, or an embedded model's name: the directory when one exists, else the named model."""
    path = Path(text)
    if path.is_dir():
        return path
    if embedded_name(text) is not None:
        return embedded_model_dir(str(text))
    raise DSV3Error(f"model directory {str(text)!r} does not exist (or name an embedded model: {', '.join(EMBEDDED)})")
