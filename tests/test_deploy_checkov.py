"""checkov's security checks on what the kit deploys: the rendered overlays (patch files alone are not
manifests), the example Secret, the extras, and both Dockerfiles. Slow: checkov is a ~450 MB install
(`make deploy-checkov`); its scan takes seconds. Every skipped check carries its reason in the manifest."""

from __future__ import annotations

import re
import subprocess

import pytest

from deploy_kit import DEPLOY, K8S, OVERLAYS, ROOT, dump, rendered, run_tool

# check id -> the objects allowed to skip it (each skip's reason is in the object's checkov.io/skip annotation)
ALLOWED_SKIPS = {"CKV_K8S_43": {"dsv3", "dsv3-worker"}, "CKV_K8S_8": {"dsv3-worker"}, "CKV_K8S_9": {"dsv3-worker"}}


@pytest.mark.slow
def test_checkov_finds_no_failed_check(tmp_path):
    res = subprocess.run(["make", "-s", "deploy-checkov"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    venv = DEPLOY / ".venv-checkov"
    scan = tmp_path / "scan"
    scan.mkdir()
    for o in OVERLAYS:
        dump(rendered(o), scan / f"{o}.yaml")
        for obj in rendered(o):
            for key, value in obj["metadata"].get("annotations", {}).items():
                if key.startswith("checkov.io/skip"):
                    check, _, reason = value.partition("=")
                    assert obj["metadata"]["name"] in ALLOWED_SKIPS[check] and len(reason) > 40, value
    for p in list((K8S / "secrets").glob("*.yaml")) + list((K8S / "extras").glob("*.yaml")):
        (scan / p.name).write_text(p.read_text())
    for name, sub in (("Dockerfile", "cpu"), ("Dockerfile.cuda", "cuda")):  # checkov finds files named Dockerfile
        (scan / sub).mkdir()
        (scan / sub / "Dockerfile").write_text((DEPLOY / name).read_text())
    out = run_tool(venv, "checkov", "-d", str(scan), "--framework", "kubernetes", "dockerfile", "secrets", "--skip-download", "--compact", "--quiet",
                   "--output", "cli")
    assert out.returncode == 0, out.stdout[-4000:]
    summary = re.findall(r"(\w+) scan results:\s+Passed checks: (\d+), Failed checks: (\d+), Skipped checks: (\d+)", out.stdout)
    frameworks = {f: (int(p), int(fl), int(s)) for f, p, fl, s in summary}
    print("checkov " + ", ".join(f"{f}: {p} passed, {fl} failed, {s} skipped" for f, (p, fl, s) in frameworks.items()))
    assert {"kubernetes", "dockerfile"} <= set(frameworks), out.stdout[-2000:]
    assert all(fl == 0 for _, fl, _ in frameworks.values()), out.stdout[-4000:]
    assert frameworks["kubernetes"][0] > 300 and frameworks["dockerfile"][0] > 100  # it really looked
    # dsv3 twice (cpu, gpu) + dsv3 and dsv3-worker (multinode) skip the digest check; the worker two probe checks
    assert frameworks["kubernetes"][2] == 6
