"""`--model long` / `LLM("long")`: the embedded models by name, a directory of the same name first."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dsv3.errors import DSV3Error
from dsv3.io import paths


def _ship(root, name: str, model_type: str = "deepseek_v3"):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": model_type}))
    return d


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    data = tmp_path / "data"
    monkeypatch.setattr(paths, "PACKAGE_DATA", data)
    for var in ("DSV3_DEFAULT_MODEL", "DSV3_DEFAULT_CHAT_MODEL"):
        monkeypatch.delenv(var, raising=False)
    return data


def test_names_resolve_to_the_shipped_directories(shipped, tmp_path, monkeypatch):
    base, chat, long = _ship(shipped, "default"), _ship(shipped, "default-chat"), _ship(shipped, "default-long", "deepseek_v4")
    monkeypatch.chdir(tmp_path)
    assert paths.model_path("default") == base
    assert paths.model_path("chat") == paths.model_path("default-chat") == chat
    assert paths.model_path("long") == paths.model_path("default-long") == long
    local = _ship(tmp_path, "long")  # a directory here shadows the name, as a local path shadows a hub id
    assert paths.model_path("long").resolve() == local
    assert paths.model_path(str(base)) == base


def test_unknown_or_missing_models_are_one_line_errors(shipped, tmp_path, monkeypatch):
    _ship(shipped, "default")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DSV3Error, match=r"'nosuch' does not exist \(or name an embedded model: default, chat, long\)"):
        paths.model_path("nosuch")
    with pytest.raises(DSV3Error, match="embedded 'long' model is not present.*make default-long"):
        paths.model_path("long")
    with pytest.raises(DSV3Error, match="no embedded model named 'huge'"):
        paths.embedded_model_dir("huge")
    assert paths.model_path("chat") == shipped / "default"  # no chat variant shipped: the base model chats


def test_cli_says_which_names_exist(tmp_path):
    bad = _run(tmp_path, "generate", "--model", "nosuch", "x")
    assert bad.returncode == 2 and "default, chat, long" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("name", ["default", "long"])
def test_cli_runs_a_shipped_model_by_name_as_by_directory(tmp_path, name):
    """`--model long` is the shipped V4 model: the same greedy text as naming its directory."""
    directory = paths.embedded_model_dir(name)
    by_name = _run(tmp_path, "generate", "--model", name, "--max-tokens", "6", "--temperature", "0", "def f(")
    by_dir = _run(tmp_path, "generate", "--model", str(directory), "--max-tokens", "6", "--temperature", "0", "def f(")
    assert by_name.returncode == 0, by_name.stderr
    assert by_name.stdout == by_dir.stdout and by_name.stdout.strip()
    if name == "long":
        assert json.loads((directory / "config.json").read_text())["model_type"] == "deepseek_v4"


def _run(cwd, *args):
    return subprocess.run([sys.executable, "-m", "dsv3", *args], capture_output=True, text=True, cwd=cwd, timeout=120)
