"""The HumanEval sandbox: correct code passes, and hostile code is contained and scored as failed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsv3.eval.sandbox import CHILD, SandboxLimits, protections, run_program

LAYERS = protections()
FAST = SandboxLimits(timeout=1.0, grace=2.0)


def sandbox_processes() -> set[int]:
    """PIDs of live sandbox children (their command line names sandbox_child.py)."""
    pids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if str(CHILD).encode() in cmd and state != "Z":
                pids.add(int(d.name))
    return pids


def test_correct_and_wrong_programs():
    assert run_program("def f(x):\n    return x + 1\nassert f(1) == 2\n").passed
    wrong = run_program("def f(x):\n    return x\nassert f(1) == 2, 'off by one'\n")
    assert not wrong.passed and wrong.result.startswith("failed: AssertionError") and "off by one" in wrong.result
    assert not run_program("raise ValueError('x')").passed
    assert not run_program("def f(:\n").passed  # syntax error


@pytest.mark.parametrize("code", ["import sys\nsys.exit(0)", "import os\nos._exit(0)",
                                  "print('passed')\nimport os\nos._exit(0)", "exit()"])
def test_early_exit_cannot_fake_a_pass(code):
    r = run_program(code)
    assert not r.passed, r


def test_infinite_loop_is_killed_and_leaves_no_process():
    before = sandbox_processes()
    t = time.monotonic()
    r = run_program("while True:\n    pass\n", FAST)
    assert r.result == "timed out" and not r.passed
    assert time.monotonic() - t < FAST.timeout + FAST.grace + 2
    assert sandbox_processes() - before == set()


def test_loop_that_swallows_the_alarm_is_killed_by_the_parent():
    before = sandbox_processes()
    r = run_program("while True:\n    try:\n        while True: pass\n    except BaseException:\n        pass\n", FAST)
    assert not r.passed and r.result == "timed out"
    assert sandbox_processes() - before == set()


def test_write_outside_directory_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    r = run_program(f"open({str(target)!r}, 'w').write('x')\n")
    assert not r.passed and not target.exists()
    inside = run_program("open('mine.txt', 'w').write('x')\nassert open('mine.txt').read() == 'x'\n")
    assert inside.passed, inside  # its own directory stays writable


@pytest.mark.skipif(not any(p.startswith("landlock") for p in LAYERS), reason="kernel without Landlock")
def test_write_outside_directory_below_python_is_refused(tmp_path):
    """posix.open skips the Python-level guard; Landlock still refuses it in the kernel."""
    target = tmp_path / "escaped.txt"
    r = run_program(f"import posix\nfd = posix.open({str(target)!r}, posix.O_WRONLY | posix.O_CREAT)\n"
                    "posix.write(fd, b'x')\n")
    assert not r.passed and "Permission" in r.result and not target.exists()


def test_memory_bomb_is_stopped():
    t = time.monotonic()
    r = run_program("blocks = []\nwhile True:\n    blocks.append(bytearray(50 << 20))\n",
                    SandboxLimits(timeout=5.0, memory_bytes=256 << 20))
    assert not r.passed and ("MemoryError" in r.result or "killed" in r.result)
    assert time.monotonic() - t < 5.0  # stopped by the limit, not by the timeout


@pytest.mark.skipif("seccomp" not in LAYERS and os.getuid() == 0, reason="no seccomp and root ignores RLIMIT_NPROC")
def test_fork_bomb_is_contained():
    before = sandbox_processes()
    r = run_program("import posix\nwhile True:\n    posix.fork()\n", FAST)
    assert not r.passed
    assert sandbox_processes() - before == set()


@pytest.mark.skipif("seccomp" not in LAYERS and os.getuid() == 0, reason="no seccomp and root ignores RLIMIT_NPROC")
def test_background_child_cannot_outlive_the_sample():
    before = sandbox_processes()
    r = run_program("import posix, time\nif posix.fork() == 0:\n    posix.setsid()\n    time.sleep(60)\n", FAST)
    assert not r.passed
    time.sleep(0.2)
    assert sandbox_processes() - before == set()


def test_socket_cannot_reach_a_local_server():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        srv.settimeout(0.5)
        port = srv.getsockname()[1]
        r = run_program(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                        "s.sendall(b'leak')\n", FAST)
        assert not r.passed
        with pytest.raises(socket.timeout):
            srv.accept()  # nothing ever connected


def test_cannot_signal_processes_outside():
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        r = run_program(f"import posix, signal\nposix.kill({victim.pid}, signal.SIGKILL)\n")
        assert not r.passed
        time.sleep(0.1)
        assert victim.poll() is None  # still alive
    finally:
        victim.kill()
        victim.wait()


def test_protections_are_reported():
    r = run_program("pass")
    assert r.passed and r.protections == LAYERS
    if sys.platform == "linux" and os.getuid() == 0:
        assert "netns" in LAYERS  # root can always create a network namespace
