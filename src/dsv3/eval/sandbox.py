"""Run untrusted, model-written programs and say whether each one passed.

Each program gets its own temporary directory and its own subprocess (`sandbox_child.py`),
started in a new session so the whole process group can be killed; the child confines itself
(network namespace, Landlock, seccomp, rlimits) before running the code. A program passes
only if the child reports "passed" with the nonce it was given; anything else (an exception,
a timeout, a crash, a kill by a resource limit) is a failure. Use `protections()` to see which
layers this machine actually provides.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

CHILD = Path(__file__).with_name("sandbox_child.py")


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits; the defaults follow openai/human-eval (3 s) with memory and file caps added."""

    timeout: float = 3.0
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    grace: float = 3.0  # extra wall time for interpreter start-up before the process group is killed


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one program: "passed", "failed: <exception>" or "timed out"."""

    passed: bool
    result: str
    protections: tuple[str, ...] = ()


def run_program(program: str, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Execute `program` (a complete Python module) in a fresh confined subprocess."""
    with tempfile.TemporaryDirectory(prefix="dsv3-sandbox-", ignore_cleanup_errors=True) as tmp:
        root = os.path.realpath(tmp)
        Path(root, "program.py").write_text(program)
        cfg = {"dir": root, "program": "program.py", "timeout": limits.timeout,
               "memory_bytes": limits.memory_bytes, "file_bytes": limits.file_bytes}
        env = {"PATH": "/usr/bin:/bin", "HOME": root, "TMPDIR": root, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        nonce = secrets.token_hex(16)
        proc = subprocess.Popen([sys.executable, "-I", "-S", str(CHILD), json.dumps(cfg)], cwd=root, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            out, _ = proc.communicate((nonce + "\n").encode(), timeout=limits.timeout + limits.grace)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.communicate()
            return ExecutionResult(False, "timed out")
        finally:
            _kill_group(proc.pid)  # anything the program left in its group dies with it
            proc.wait()
        return _verdict(out, proc.returncode, nonce)


def run_programs(programs: Sequence[str], limits: SandboxLimits = SandboxLimits(), workers: int | None = None,
                 desc: str = "execute") -> list[ExecutionResult]:
    """Run many programs, `workers` at a time (each in its own sandbox), keeping their order."""
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(programs), desc=desc, unit="sample", disable=None) as bar:
        futures = [pool.submit(run_program, p, limits) for p in programs]
        results = []
        try:
            for f in futures:
                results.append(f.result())
                bar.update(1)
        except BaseException:  # e.g. Ctrl-C: do not start the remaining samples
            for f in futures:
                f.cancel()
            raise
    return results


def protections() -> tuple[str, ...]:
    """The isolation layers a program gets on this machine (e.g. netns, landlock-v7, seccomp)."""
    return run_program("pass").protections


def _verdict(out: bytes, returncode: int, nonce: str) -> ExecutionResult:
    try:
        report = json.loads(out.decode(errors="replace").strip().splitlines()[-1])
    except (ValueError, IndexError):
        report = None
    if not isinstance(report, dict) or report.get("nonce") != nonce:
        if returncode < 0:
            return ExecutionResult(False, f"failed: killed by {signal.Signals(-returncode).name}")
        return ExecutionResult(False, f"failed: exited with status {returncode} before finishing")
    result = str(report.get("result", "failed: no verdict"))
    return ExecutionResult(result == "passed" and returncode == 0, result, tuple(report.get("protections", ())))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
