"""Confine this process, then run one untrusted program in it (started by `sandbox.py`).

Run as `python -I -S sandbox_child.py CONFIG_JSON` in a fresh process group with the program's
temporary directory as working directory. Model-written code is untrusted, so before running
it this process takes, in order and each where the kernel allows: a new network namespace,
Landlock rules (writes only below the directory, no TCP, no signals leaving the sandbox),
rlimits (CPU, address space, file size, open files), a seccomp filter (no fork/clone/socket/
kill), and a Python-level guard like openai/human-eval's `reliability_guard`. The verdict goes
back on a private copy of stdout, tagged with a nonce read from stdin, so a program that exits
early or prints "passed" cannot fake a pass. Standard library only: no site-packages are loaded.
"""

import ctypes
import json
import os
import platform
import resource
import signal
import sys

LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
# (audit arch, {syscall name: number}) for the architectures we filter.
SYSCALLS = {
    "x86_64": (0xC000003E, {"clone": 56, "fork": 57, "vfork": 58, "clone3": 435, "socket": 41, "kill": 62}),
    "aarch64": (0xC00000B7, {"clone": 220, "clone3": 435, "socket": 198, "kill": 129}),
}


def new_network_namespace() -> bool:
    """An empty network namespace: not even loopback is up, so no connection can succeed."""
    for flags in (CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNET):
        if LIBC.unshare(flags) == 0:
            return True
    return False


class _Ruleset(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock(root: str) -> int:
    """Deny every write outside `root` (plus TCP and outbound signals on newer ABIs); returns the ABI or 0."""
    abi = LIBC.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        return 0
    write = (1 << 1) | (1 << 4) | (1 << 5) | sum(1 << b for b in range(6, 13))  # write, remove, make_*
    write |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)      # refer, truncate
    attr = _Ruleset(write, 0b11 if abi >= 4 else 0, 0b11 if abi >= 6 else 0)   # tcp bind/connect; unix/signal scope
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = LIBC.syscall(444, ctypes.byref(attr), ctypes.c_size_t(size), 0)
    if ruleset < 0:
        return 0
    for path, allowed in ((root, write), ("/dev/null", (1 << 1) | (1 << 14 if abi >= 3 else 0))):
        fd = os.open(path, os.O_PATH)
        rule = _PathBeneath(allowed, fd)
        if LIBC.syscall(445, ruleset, 1, ctypes.byref(rule), 0) != 0:
            return 0
        os.close(fd)
    LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    return abi if LIBC.syscall(446, ruleset, 0) == 0 else 0


class _Filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_Filter))]


def seccomp() -> bool:
    """Make fork/clone/socket/kill fail with EPERM; a syscall of a foreign ABI kills the process."""
    if platform.machine() not in SYSCALLS:
        return False
    arch, table = SYSCALLS[platform.machine()]
    nrs = sorted(table.values())
    m = len(nrs)
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    prog = [(ld, 0, 0, 4), (jeq, 0, m + 4, arch), (ld, 0, 0, 0), (jge, m + 2, 0, 0x40000000)]
    prog += [(jeq, m - j, 0, nr) for j, nr in enumerate(nrs)]
    prog += [(ret, 0, 0, 0x7FFF0000), (ret, 0, 0, 0x00050000 | 1), (ret, 0, 0, 0x80000000)]  # allow, EPERM, kill
    arr = (_Filter * len(prog))(*[_Filter(*p) for p in prog])
    LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    fprog = _Prog(len(prog), arr)
    return LIBC.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0


def limits(cfg: dict, forks_blocked: bool) -> None:
    cpu = int(cfg["timeout"]) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_bytes"], cfg["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if not forks_blocked and os.getuid() != 0:  # root ignores RLIMIT_NPROC; seccomp covers it there
        resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
    resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_bytes"], cfg["memory_bytes"]))


def python_guard(root: str) -> None:
    """Refuse, at the Python level, writes outside `root` and process/signal operations."""
    import builtins
    import io
    import shutil
    import subprocess

    def inside(path) -> bool:
        if isinstance(path, int):
            return True
        p = os.path.realpath(os.fsdecode(os.fspath(path)))
        return p == root or p.startswith(root + os.sep)

    def deny(what):
        def blocked(*_a, **_k):
            raise PermissionError(f"sandbox: {what} is not allowed")
        return blocked

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(f"sandbox: writing outside the sample directory is not allowed: {file}")
        return real_open(file, mode, *a, **k)

    def guarded_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) and not inside(path):
            raise PermissionError(f"sandbox: writing outside the sample directory is not allowed: {path}")
        return real_os_open(path, flags, *a, **k)

    def path_checked(fn, nargs):
        def wrapped(*a, **k):
            if not all(inside(p) for p in a[:nargs]):
                raise PermissionError(f"sandbox: {fn.__name__} outside the sample directory is not allowed")
            return fn(*a, **k)
        return wrapped

    builtins.open = io.open = guarded_open
    os.open = guarded_os_open
    for name, nargs in (("remove", 1), ("unlink", 1), ("rmdir", 1), ("removedirs", 1), ("mkdir", 1),
                        ("makedirs", 1), ("truncate", 1), ("chmod", 1), ("chown", 1), ("rename", 2),
                        ("renames", 2), ("replace", 2), ("link", 2), ("symlink", 2)):
        setattr(os, name, path_checked(getattr(os, name), nargs))
    for name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "setsid", "execv", "execve", "execvp",
                 "execvpe", "spawnv", "spawnve", "posix_spawn", "posix_spawnp", "chroot", "setuid", "putenv"):
        if hasattr(os, name):
            setattr(os, name, deny(f"os.{name}"))
    subprocess.Popen = deny("subprocess")
    shutil.rmtree, shutil.move, shutil.chown = deny("shutil.rmtree"), deny("shutil.move"), deny("shutil.chown")


def main() -> None:
    cfg = json.loads(sys.argv[1])
    root = os.path.realpath(cfg["dir"])
    nonce = sys.stdin.readline().strip()
    verdict_fd = os.dup(1)
    out = os.open(os.path.join(root, "output.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    with open(os.path.join(root, cfg["program"])) as f:
        code = compile(f.read(), cfg["program"], "exec")
    protections = []
    linux = sys.platform.startswith("linux")  # the raw syscall numbers below are Linux's
    if linux and new_network_namespace():
        protections.append("netns")
    abi = landlock(root) if linux else 0
    if abi:
        protections.append(f"landlock-v{abi}")
    forks_blocked = linux and seccomp()
    if forks_blocked:
        protections.append("seccomp")
    try:
        limits(cfg, forks_blocked)
        protections.append("rlimits")
    except (ValueError, OSError):
        pass
    python_guard(root)
    protections.append("python-guard")
    write, dumps, settimer = os.write, json.dumps, signal.setitimer

    def on_alarm(*_):
        raise TimeoutError("timed out")

    signal.signal(signal.SIGALRM, on_alarm)
    try:
        settimer(signal.ITIMER_REAL, cfg["timeout"])
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
        settimer(signal.ITIMER_REAL, 0)
        result = "passed"
    except TimeoutError as e:
        result = "timed out" if str(e) == "timed out" else f"failed: TimeoutError: {e}"
    except BaseException as e:  # noqa: BLE001 - SystemExit and friends are failures too
        result = f"failed: {type(e).__name__}: {e}"[:500]
    settimer(signal.ITIMER_REAL, 0)
    write(verdict_fd, dumps({"nonce": nonce, "result": result, "protections": protections}).encode())
    os._exit(0)


if __name__ == "__main__":
    main()
