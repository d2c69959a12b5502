"""Kernels built ahead of time (a container image's builder stage) and loaded without a compiler.

The runtime image has no compiler: `python -m dsv3.kernels.prebuild` writes one library per x86-64
level and DSV3_KERNELS_PREBUILT makes `dsv3.kernels` pick the most capable one the CPU can run, or
fall back to PyTorch ops. Checked here: the choice follows the CPU's flags, a library built from
other sources is never loaded, and the prebuilt library computes what PyTorch computes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dsv3 import kernels
from dsv3.kernels.prebuild import main as prebuild_main

ROOT = Path(__file__).parents[1]
LEVELS = ("x86-64-v3", "x86-64-v4")
pytestmark = pytest.mark.skipif(kernels.machine() != "x86_64" or kernels.compilers() is None,
                                reason="x86-64 levels need an x86-64 C and C++ compiler")


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prebuilt")
    assert prebuild_main([str(out), *LEVELS]) == 0
    return out


def fresh(monkeypatch, directory: Path, flags: set[str] | None = None):
    """What a new process would load with DSV3_KERNELS_PREBUILT=directory (and these CPU flags): a path, or why none."""
    monkeypatch.setenv("DSV3_KERNELS_PREBUILT", str(directory))
    monkeypatch.setenv("CC", "/nonexistent/cc")  # a prebuilt directory never compiles
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    if flags is not None:
        monkeypatch.setattr(kernels, "cpu_features", lambda: frozenset(flags))
    return kernels.locate()


def test_levels_are_named_after_the_sources(prebuilt):
    names = sorted(p.name for p in prebuilt.iterdir() if p.suffix == ".so")
    assert names == sorted(kernels.prebuilt_name(level) for level in LEVELS)
    assert len({n.split("-")[1] for n in names}) == 1  # one digest of the sources and the torch build


def test_most_capable_level_the_cpu_runs_is_loaded(prebuilt, monkeypatch):
    v3, v4 = (set(kernels.X86_LEVELS[level].split()) for level in LEVELS)
    assert fresh(monkeypatch, prebuilt, v4 | {"sse2"}).name == kernels.prebuilt_name("x86-64-v4")
    assert fresh(monkeypatch, prebuilt, v3 | {"avx512f"}).name == kernels.prebuilt_name("x86-64-v3")


def test_cpu_below_every_level_falls_back(prebuilt, monkeypatch):
    v3 = set(kernels.X86_LEVELS["x86-64-v3"].split())
    why = fresh(monkeypatch, prebuilt, v3 - {"avx2"})
    assert isinstance(why, str) and "no library in" in why


def test_library_of_other_sources_is_not_loaded(prebuilt, tmp_path, monkeypatch):
    for p in prebuilt.glob("*.so"):  # the same libraries under another source digest
        shutil.copy(p, tmp_path / p.name.replace(p.name.split("-")[1], "0" * 16))
    why = fresh(monkeypatch, tmp_path, kernels.cpu_features())
    assert isinstance(why, str) and "0000000000000000" in why


def test_prebuilt_computes_what_pytorch_does(prebuilt, monkeypatch):
    """The library this CPU gets decodes a model as PyTorch does (the decode test of test_kernels, in a process
    whose only kernels are the prebuilt ones), and the x86-64-v3 one has no AVX-512 instructions."""
    code = (
        "import sys; sys.path.insert(0, 'tests'); import test_kernels as t, torch\n"
        "from pathlib import Path; from dsv3 import kernels, ops\n"
        "class MP:\n"
        "    def __init__(self): self.undo = []\n"
        "    def setattr(self, obj, name, value): self.undo.append((obj, name, getattr(obj, name))); setattr(obj, name, value)\n"
        "for method in ('none', 'int8'):\n"
        "    mp = MP(); t.test_model_decode_same_with_and_without_kernels(mp, method, 'step')\n"
        "    for obj, name, value in reversed(mp.undo): setattr(obj, name, value)\n"
        "x, w = torch.randn(5, 300) * 2, torch.rand(300) + 0.5\n"
        "with torch.no_grad(): torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), "
        "x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w, atol=1e-5, rtol=1e-5)\n"
        "print(Path(kernels.status()).name)\n")
    env = {**os.environ, "DSV3_KERNELS_PREBUILT": str(prebuilt), "CC": "/nonexistent/cc", "CXX": "/nonexistent/c++"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    level = "x86-64-v4" if "avx512bw" in kernels.cpu_features() else "x86-64-v3"
    assert out.stdout.strip().endswith(kernels.prebuilt_name(level)), out.stderr[-2000:]
    if shutil.which("objdump"):
        dis = subprocess.run(["objdump", "-d", str(prebuilt / kernels.prebuilt_name("x86-64-v3"))],
                             capture_output=True, text=True).stdout
        assert "%ymm" in dis and "%zmm" not in dis


def test_prebuild_refuses_unknown_level(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        prebuild_main([str(tmp_path), "x86-64-v9"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
