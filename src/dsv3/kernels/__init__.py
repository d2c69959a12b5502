"""The native CPU library: C decode kernels registered as the CPU kernels of the `dsv3::` ops.

A batch-1 decode step is bound by weight traffic, but PyTorch spends much of it in per-op overhead
and in small GEMVs that do not reach memory bandwidth. The C kernels (`csrc/decode.c`, `mla.c`,
`step.c`) read each weight row once per step in one OpenMP region per call, and `csrc/ops.cpp`
registers them as the CPU implementations of the ops `dsv3.ops.schemas` declares (PyTorch checks
the two signatures agree when the library loads). They share PyTorch's OpenMP thread count.

The library is built on first use and cached, keyed by everything that makes a binary: the
sources, the compilers (their version lines), the flags, the target (x86-64 with AVX-512 or AVX2,
aarch64 with NEON, or generic), the CPU's feature flags, and the torch version and C++ ABI it links
against -- so a cache shared between machines never hands one CPU another's instructions. Where
no library can be had (no C/C++ compiler, an unsupported OS, a failed build, DSV3_KERNELS=0) the
ops run their PyTorch reference kernels, and one log line says why.

Environment: DSV3_CACHE (cache root, default ~/.cache/dsv3), CC / CXX, DSV3_KERNELS_CFLAGS (extra
flags, e.g. -mno-avx512f for the portable code), DSV3_KERNELS=0 (off), DSV3_KERNELS_PREBUILT (a
directory of libraries built ahead of time by `python -m dsv3.kernels.prebuild` for declared
x86-64 levels; the most capable one this CPU can run is loaded, nothing is compiled).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

log = logging.getLogger("dsv3.kernels")

CSRC = Path(__file__).parent / "csrc"
C_SOURCES = ("attend.c", "batch.c", "decode.c", "grouped.c", "mla.c", "step.c", "spec.c", "screen.c", "index.c", "hyper.c")
CXX_SOURCES = ("ops.cpp",)
HEADERS = ("common.h", "step.h")
BASE_FLAGS = ("-O3", "-fPIC", "-ffp-contract=fast")
# x86-64 psABI micro-architecture levels a prebuilt library may target -> the /proc/cpuinfo flags each may use
X86_LEVELS = {
    "x86-64-v3": "sse4_1 sse4_2 ssse3 popcnt cx16 lahf_lm avx avx2 bmi1 bmi2 f16c fma movbe abm xsave",
    "x86-64-v4": "sse4_1 sse4_2 ssse3 popcnt cx16 lahf_lm avx avx2 bmi1 bmi2 f16c fma movbe abm xsave "
                 "avx512f avx512bw avx512cd avx512dq avx512vl",
}
AVX512 = {"avx512f", "avx512bw", "avx512vl"}


@dataclass(frozen=True)
class Target:
    """What the library is compiled for on this machine: a name for humans and the ISA flags."""

    name: str
    flags: tuple[str, ...]


def cpu_features() -> frozenset[str]:
    """This CPU's feature flags as the OS reports them (Linux /proc/cpuinfo 'flags' or 'Features'; macOS sysctl)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.partition(":")[2].split())
    if sys.platform == "darwin":
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"],
                             capture_output=True, text=True)
        return frozenset(out.stdout.lower().split())
    return frozenset()


cpu_flags = cpu_features  # the name the prebuilt-library tools use


def machine() -> str:
    return platform.machine().lower()


def target(features: frozenset[str] | None = None) -> Target:
    """ISA flags for a build on this machine: all of this CPU (-march/-mcpu=native) on x86-64 and aarch64.

    On x86-64 with AVX-512 GCC is told to prefer 512-bit vectors (it picks 256 for -march=native on
    recent Xeons; ~1.6x on int8 rows). Elsewhere: no ISA flags (the portable code paths)."""
    features = cpu_features() if features is None else features
    m = machine()
    if m in ("x86_64", "amd64"):
        if AVX512 <= features:
            return Target("x86-64 AVX-512", ("-march=native", "-mprefer-vector-width=512"))
        if {"avx2", "fma"} <= features:
            return Target("x86-64 AVX2", ("-march=native",))
        return Target("x86-64", ("-march=native",))
    if m in ("aarch64", "arm64"):
        return Target("aarch64 NEON", ("-mcpu=native",))
    return Target(m or "unknown", ())


def compilers() -> tuple[str, str] | None:
    """(C compiler, C++ compiler), or None when either is missing."""
    def find(env: str, *names: str) -> str | None:
        if os.environ.get(env):  # as given; missing means none (not a silent switch to another compiler)
            return shutil.which(os.environ[env])
        return next((p for p in map(shutil.which, names) if p), None)

    cc, cxx = find("CC", "cc", "gcc", "clang"), find("CXX", "c++", "g++", "clang++")
    return (cc, cxx) if cc and cxx else None


@lru_cache(maxsize=None)
def _version(compiler: str) -> str:
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return compiler
    return (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else compiler


def openmp_flags() -> tuple[str, ...]:
    # Apple's clang has no -fopenmp: build without OpenMP there (the pragmas then do nothing: one thread)
    return () if sys.platform == "darwin" else ("-fopenmp",)


def _torch_build() -> tuple[str, list[str], list[str], list[str]]:
    """(torch version + ABI, include flags, link flags, defines) to build against the running torch."""
    import torch

    root = Path(torch.__file__).parent
    lib = root / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}"]
    links = [f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu"]
    return f"{torch.__version__} abi{abi}", includes, links, [f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]


def sources_digest() -> str:
    return hashlib.sha256(b"".join((CSRC / f).read_bytes() for f in C_SOURCES + CXX_SOURCES + HEADERS)).hexdigest()


def build_key(cc: str, cxx: str, flags: tuple[str, ...], features: frozenset[str]) -> str:
    """The cache key: sources, both compilers' versions, flags, CPU features, machine, torch and its ABI."""
    torch_id = _torch_build()[0]
    parts = [sources_digest(), cc, _version(cc), cxx, _version(cxx), " ".join(flags), " ".join(sorted(features)),
             machine(), sys.platform, torch_id]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def compile_library(cc: str, cxx: str, flags: tuple[str, ...], so: Path) -> str | None:
    """Compile and link the library into `so` (atomically replaced); None, or why it failed."""
    _, includes, links, defines = _torch_build()
    so.parent.mkdir(parents=True, exist_ok=True)
    omp = openmp_flags()
    with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
        objs, jobs = [], []
        for src in C_SOURCES:
            obj = Path(tmp) / (src + ".o")
            jobs.append([cc, *flags, *omp, "-std=c11", "-c", str(CSRC / src), "-o", str(obj)])
            objs.append(obj)
        for src in CXX_SOURCES:
            obj = Path(tmp) / (src + ".o")
            jobs.append([cxx, *flags, *omp, "-std=c++17", "-w", *defines, *includes, "-c", str(CSRC / src), "-o", str(obj)])
            objs.append(obj)
        jobs.append([cxx, "-shared", *flags, *omp, *map(str, objs), "-o", str(Path(tmp) / so.name), *links, "-lm"])
        for cmd in jobs:
            try:
                res = subprocess.run(cmd, capture_output=True, text=True)
            except OSError as e:
                return f"{cmd[0]} could not run: {e}"
            if res.returncode != 0:
                return f"{Path(cmd[0]).name} failed: {res.stderr.strip().splitlines()[-1][:200] if res.stderr.strip() else res.returncode}"
        os.replace(Path(tmp) / so.name, so)  # atomic: concurrent builders never load a half-written file
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("DSV3_CACHE", Path.home() / ".cache" / "dsv3")) / "kernels"


def prebuilt_name(level: str) -> str:
    """File name of a library prebuilt for x86-64 `level` from these sources against this torch."""
    torch_id = _torch_build()[0]
    return f"dsv3ops-{hashlib.sha256((sources_digest() + torch_id).encode()).hexdigest()[:16]}-{level}.so"


def _prebuilt(directory: Path, features: frozenset[str]) -> Path | str:
    """The most capable library in `directory` built from these sources that this CPU can run, or why none."""
    for level in sorted(X86_LEVELS, key=lambda lv: -len(X86_LEVELS[lv].split())):
        so = directory / prebuilt_name(level)
        if so.exists() and set(X86_LEVELS[level].split()) <= features:
            return so
    found = sorted(p.name for p in directory.glob("dsv3ops-*.so")) if directory.is_dir() else []
    return f"no library in {directory} fits these sources and this CPU (found: {', '.join(found) or 'none'})"


def locate() -> Path | str:
    """The library to load (building it if needed), or the reason there is none."""
    if os.environ.get("DSV3_KERNELS", "1") == "0":
        return "switched off (DSV3_KERNELS=0)"
    if sys.platform.startswith("win"):
        return f"{sys.platform} is not supported"
    features = cpu_features()
    if os.environ.get("DSV3_KERNELS_PREBUILT"):
        return _prebuilt(Path(os.environ["DSV3_KERNELS_PREBUILT"]), features)
    tools = compilers()
    if tools is None:
        return "no C and C++ compiler (set CC and CXX)"
    cc, cxx = tools
    flags = (*BASE_FLAGS, *target(features).flags, *shlex.split(os.environ.get("DSV3_KERNELS_CFLAGS", "")))
    so = cache_dir() / f"dsv3ops-{build_key(cc, cxx, flags, features)}.so"
    if not so.exists():
        err = compile_library(cc, cxx, flags, so)
        if err is not None:
            return err
    return so


_VALIDATE = """
import sys, torch
from dsv3.ops import layout, schemas
torch.ops.load_library(sys.argv[1])
assert tuple(torch.ops.dsv3_native.plan_layout()) == layout.LAYOUT, "the plan layouts differ"
missing = set(schemas.SCHEMAS) - set(schemas.registered_cpu_kernels())
assert not missing, f"no CPU kernel for {sorted(missing)}"
"""


def validate(so: Path) -> str | None:
    """Load `so` in a child process first: None when it registers a CPU kernel for every op with the declared
    schemas (PyTorch aborts a process whose library disagrees with a schema, so this one must not try), else why.
    A passing library is remembered (a marker in the cache directory) and not checked again."""
    marker = cache_dir() / (so.name + ".ok")
    if marker.is_file() and marker.read_text() == str(so):
        return None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", _VALIDATE, str(so)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        reason = next((ln.strip() for ln in lines if "schema" in ln), None) or \
            next((ln.strip() for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else "")
        return f"{so.name} does not match the op schemas: {reason[:200]}"
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(so))
    except OSError:  # a read-only cache: check again next time
        pass
    return None


_state: dict[str, object] = {}


def load() -> bool:
    """Register the native CPU kernels (once per process); False, after one log line saying why, when unavailable."""
    if "ok" not in _state:
        import torch

        from dsv3.ops import layout, schemas  # the schemas must exist before the library registers kernels

        found = locate()
        ok, why = False, found
        if isinstance(found, Path) and (bad := validate(found)) is not None:
            found = why = bad
        if isinstance(found, Path):
            try:
                torch.ops.load_library(str(found))
                native_layout = tuple(torch.ops.dsv3_native.plan_layout())
                if native_layout != layout.LAYOUT:
                    raise RuntimeError(f"its plan layout {native_layout} is not {layout.LAYOUT}")
                ok, why = True, str(found)
            except (OSError, RuntimeError) as e:
                cause = e.__cause__ or e
                why = f"{found.name} did not load: {str(cause).splitlines()[0][:200]}"
        _state.update(ok=ok, why=why, ops=schemas.registered_cpu_kernels() if ok else [])
        if not ok:
            log.warning("dsv3: native CPU kernels unavailable (%s); using the PyTorch ops", why)
    return bool(_state["ok"])


def status() -> str:
    """Where the native kernels came from, or why there are none (after `load`)."""
    load()
    return str(_state["why"])
