"""The container image's HEALTHCHECK: GET /health of the `dsv3 serve` running in this container.

The port and whether it speaks TLS are read from the server's own command line (PID 1: `dsv3 serve ...`, or
`torchrun ... -m dsv3 serve ...`), so the check follows whatever flags the container was started with. The
request goes to the loopback address; the server's certificate names the service, not 127.0.0.1, so it is
not verified here (the check proves liveness, not identity). Exit 0 when /health answers 200, else 1.
Standard library only: it runs every 30 s and must not import torch.
"""

from __future__ import annotations

import argparse
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path


def serve_flags(cmdline: list[str]) -> tuple[int, bool]:
    """(port, TLS on) from a `dsv3 serve` command line; dsv3's defaults where a flag is absent."""
    port, tls = 8000, False
    for i, arg in enumerate(cmdline):
        name, eq, value = arg.partition("=")
        if not eq:
            value = cmdline[i + 1] if i + 1 < len(cmdline) else ""
        if name == "--port":
            port = int(value)
        elif name == "--tls-certfile":
            tls = True
    return port, tls


def check(port: int, tls: bool, timeout: float = 4.0) -> bool:
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/health"
    context = None
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pid", type=int, default=1, help="process whose command line is the server's (default 1)")
    args = p.parse_args(argv)
    cmdline = Path(f"/proc/{args.pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    port, tls = serve_flags(cmdline)
    ok = check(port, tls)
    print(f"{'https' if tls else 'http'}://127.0.0.1:{port}/health: {'ok' if ok else 'not ready'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
