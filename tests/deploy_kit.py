"""Helpers for the deploy/ tests: the rendered overlays, their pods as the kubelet would start them, tools.

A pod's command line is computed as the kubelet does it (container env, the downward API's pod-index label,
`$(VAR)` expansion in command and args) and then parsed by the real parsers: torchrun's
(`torch.distributed.run.get_args_parser`) and dsv3's (`dsv3.cli.build_parser`). Absolute paths in the
flags must lie on a volume the pod mounts (the root filesystem is read-only); `materialize` maps them into
a temporary directory holding what the volumes would (the example API-key Secret, a self-signed
certificate, empty claims), so `dsv3 serve`'s own checks run on them.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

import kustomize_lite

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu", "multinode")
POD_INDEX = "apps.kubernetes.io/pod-index"
SHUTDOWN_MARGIN = 10  # seconds past --grace-period the base allows to stop the engine and close the audit log


@lru_cache(maxsize=None)
def rendered(overlay: str) -> tuple[dict, ...]:
    return tuple(kustomize_lite.build(K8S / "overlays" / overlay))


def find(objs, kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's `$(VAR)` expansion: defined variables are replaced, `$$` is a literal `$`."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


@dataclass
class Pod:
    statefulset: dict
    ordinal: int
    container: dict
    env: dict[str, str]
    argv: list[str]  # command + args, expanded
    torchrun: object | None = None  # torchrun's parsed namespace
    serve_argv: list[str] = field(default_factory=list)

    @property
    def spec(self) -> dict:
        return self.statefulset["spec"]["template"]["spec"]

    @property
    def name(self) -> str:
        return f"{self.statefulset['metadata']['name']}-{self.ordinal}"

    def mounts(self) -> dict[str, dict]:
        """mountPath -> {volume, readOnly} (volume: the pod volume or the volumeClaimTemplate)."""
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        for t in self.statefulset["spec"].get("volumeClaimTemplates", []):
            volumes[t["metadata"]["name"]] = {"name": t["metadata"]["name"], "claimTemplate": t}
        return {m["mountPath"]: {"volume": volumes[m["volumeName"] if "volumeName" in m else m["name"]],
                                 "readOnly": m.get("readOnly", False)} for m in self.container.get("volumeMounts", [])}


def pods(objs) -> list[Pod]:
    """Every pod the overlay's StatefulSets start (one replica where an HPA owns the count)."""
    from torch.distributed.run import get_args_parser

    out = []
    for sts in find(objs, "StatefulSet"):
        spec = sts["spec"]
        start = spec.get("ordinals", {}).get("start", 0)
        labels = spec["template"]["metadata"]["labels"]
        for ordinal in range(start, start + spec.get("replicas", 1)):
            pod_labels = {**labels, POD_INDEX: str(ordinal)}
            for c in spec["template"]["spec"]["containers"]:
                env: dict[str, str] = {}
                for e in c.get("env", []):
                    if "value" in e:
                        env[e["name"]] = expand(e["value"], env)
                    else:
                        path = e["valueFrom"]["fieldRef"]["fieldPath"]
                        m = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
                        assert m, f"{sts['metadata']['name']}: unsupported fieldRef {path}"
                        env[e["name"]] = pod_labels[m.group(1)]
                argv = [expand(a, env) for a in c.get("command", []) + c.get("args", [])]
                pod = Pod(sts, ordinal, c, env, argv)
                if argv[0] == "torchrun":
                    pod.torchrun = get_args_parser().parse_args(argv[1:])
                    pod.serve_argv = list(pod.torchrun.training_script_args)
                else:
                    assert argv[0] == "dsv3", f"{pod.name}: command {argv[0]!r} is neither dsv3 nor torchrun"
                    pod.serve_argv = argv[1:]
                out.append(pod)
    return out


def self_signed(directory: Path) -> tuple[Path, Path]:
    """tls.crt / tls.key for 127.0.0.1 (what a kubernetes.io/tls Secret holds)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dsv3")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    crt, k = directory / "tls.crt", directory / "tls.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return crt, k


def example_secret(name: str) -> dict:
    for path in sorted((K8S / "secrets").glob("*.yaml")):
        for doc in kustomize_lite.load_docs(path):
            if doc["kind"] == "Secret" and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no example Secret {name} in deploy/k8s/secrets")


def materialize(pod: Pod, root: Path) -> list[str]:
    """pod.serve_argv with every absolute path moved under `root`, where the volume contents are created.

    Fails when a path lies on no mounted volume, or when a path the server writes is on a read-only one."""
    mounts = pod.mounts()
    out = []
    for arg in pod.serve_argv:
        flag, eq, value = arg.partition("=")
        if not (eq and value.startswith("/")):
            assert not arg.startswith("/"), f"{pod.name}: give paths as --flag=/path ({arg})"
            out.append(arg)
            continue
        mount = max((m for m in mounts if value == m or value.startswith(m.rstrip("/") + "/")), key=len, default=None)
        assert mount is not None, f"{pod.name}: {flag}={value} is on no mounted volume (the root filesystem is read-only)"
        vol, ro = mounts[mount]["volume"], mounts[mount]["readOnly"]
        local = root / value.lstrip("/")
        rel = Path(value).relative_to(mount)
        if "secret" in vol:
            secret = vol["secret"]["secretName"]
            assert ro, f"{pod.name}: Secret {secret} must be mounted read-only"
            if secret == "dsv3-tls":
                assert str(rel) in ("tls.crt", "tls.key", "ca.crt"), f"{flag}: a kubernetes.io/tls Secret has no {rel}"
                self_signed(local.parent)
            else:
                data = example_secret(secret).get("stringData", {})
                assert str(rel) in data, f"{flag}: Secret {secret} has no key {rel}"
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_text(data[str(rel)])
        elif flag in ("--audit-log", "--response-cache"):
            assert not ro and "claimTemplate" in vol, f"{pod.name}: {flag} must be on a writable per-replica volume"
            local.parent.mkdir(parents=True, exist_ok=True)
        elif flag == "--model":
            assert ro, f"{pod.name}: the model volume must be mounted read-only"
            local.mkdir(parents=True, exist_ok=True)
        else:
            raise AssertionError(f"{pod.name}: no rule for path flag {flag}")
        out.append(f"{flag}={local}")
    return out


def tools_venv() -> Path:
    """deploy/.venv-tools (hadolint, kubernetes-validate), made from PyPI by `make deploy-tools` when missing."""
    venv = DEPLOY / ".venv-tools"
    res = subprocess.run(["make", "-s", "deploy-tools"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, f"make deploy-tools failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
    return venv


def run_tool(venv: Path, *argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], capture_output=True, text=True, **kw)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) pairs with continuation lines joined and comments dropped."""
    lines, cur = [], ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#") and not cur:
            continue
        if raw.rstrip().endswith("\\"):
            cur += raw.rstrip()[:-1] + " "
            continue
        cur += raw
        if cur.strip():
            lines.append(cur.strip())
        cur = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def dump(objs, path: Path) -> Path:
    path.write_text(yaml.safe_dump_all(list(objs), sort_keys=False))
    return path

