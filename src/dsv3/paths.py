"""Where dsv3 finds things it ships: the embedded default model."""

from __future__ import annotations

import os
from pathlib import Path

from dsv3.errors import DSV3Error

PACKAGE_DATA = Path(__file__).parent / "data"


def default_model_dir(chat: bool = False) -> Path:
    """The embedded default model (or its chat-tuned variant); `DSV3_DEFAULT_MODEL` overrides it."""
    override = os.environ.get("DSV3_DEFAULT_MODEL")
    path = Path(override) if override else PACKAGE_DATA / ("default-chat" if chat else "default")
    if not (path / "config.json").is_file():
        raise DSV3Error(f"the embedded default model is not present at {path}; pass --model DIR")
    return path
