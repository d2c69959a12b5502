"""deploy/k8s: the rendered overlays validate against Kubernetes' schemas, and every pod starts a command
that torchrun's and dsv3's real argument parsers accept, with probes, ports, secrets, volumes and sizes
that agree with what `dsv3 serve` and `dsv3 plan` actually do."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess

import pytest
import yaml

import kustomize_lite
from deploy_kit import (K8S, OVERLAYS, POD_INDEX, ROOT, SHUTDOWN_MARGIN, dump, example_secret, expand,
                        find, materialize, pods, rendered, run_tool, tools_venv)
from dsv3.cli import build_parser

SCHEMA_VERSIONS_FROM = (1, 30)


@pytest.fixture(scope="module")
def tools():
    return tools_venv()


def serve_args(pod, tmp_path):
    args = build_parser().parse_args(materialize(pod, tmp_path / pod.name))
    assert args.command == "serve"
    return args


# --- rendering and schemas ---------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (the renderer is then the reference)")
def test_renderer_matches_kubectl_kustomize(tmp_path):
    tenant = tmp_path / "tenant"
    tenant.mkdir()
    cpu = os.path.relpath(K8S / "overlays" / "cpu", tenant)  # kustomize refuses absolute paths
    (tenant / "kustomization.yaml").write_text(f"namespace: tenant-a\nresources:\n- {cpu}\n")
    for d in [K8S / "overlays" / o for o in OVERLAYS] + [tenant]:
        out = subprocess.run(["kubectl", "kustomize", str(d)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        theirs = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
        assert kustomize_lite.normalized(kustomize_lite.build(d)) == kustomize_lite.normalized(theirs), d
    objs = kustomize_lite.build(tenant)
    assert {o["metadata"].get("namespace", o["metadata"]["name"]) for o in objs} == {"tenant-a"}


def test_overlays_validate_against_kubernetes_schemas(tools, tmp_path):
    files = [str(dump(rendered(o), tmp_path / f"{o}.yaml")) for o in OVERLAYS]
    files += [str(p) for p in sorted((K8S / "secrets").glob("*.yaml"))]
    bad = [dict(d) for d in rendered("cpu")]  # a typo the schema must catch: proves the validator is live
    sts = next(i for i, d in enumerate(bad) if d["kind"] == "StatefulSet")
    bad[sts] = json.loads(json.dumps(bad[sts]).replace('"readOnlyRootFilesystem"', '"readOnlyRootFileSystem"'))
    dump(bad, tmp_path / "typo.yaml")
    script = (
        "import sys, yaml\n"
        "from kubernetes_validate import utils\n"
        "versions = [v for v in utils.all_versions() if tuple(map(int, v.split('.')[:2])) >= (%d, %d)]\n"
        "print('versions', ' '.join(versions))\n"
        "for f in sys.argv[1:]:\n"
        "    for doc in yaml.safe_load_all(open(f)):\n"
        "        for v in versions:\n"
        "            try:\n"
        "                utils.validate(doc, v, strict=True)\n"
        "            except Exception as e:\n"
        "                print('FAIL', f, doc['kind'], doc['metadata']['name'], v, str(e).splitlines()[0])\n"
    ) % SCHEMA_VERSIONS_FROM
    out = run_tool(tools, "python", "-c", script, *files, str(tmp_path / "typo.yaml"))
    assert out.returncode == 0, out.stderr
    versions = out.stdout.splitlines()[0].split()[1:]
    assert versions[0].startswith("1.30") and len(versions) >= 2, versions
    fails = [line for line in out.stdout.splitlines() if line.startswith("FAIL")]
    assert fails and all("typo.yaml" in line and "readOnlyRootFileSystem" in line for line in fails), "\n".join(fails)
    assert len(fails) == len(versions)  # the typo, once per version; nothing else


def test_hadolint_passes_both_dockerfiles(tools, tmp_path):
    out = run_tool(tools, "hadolint", str(ROOT / "deploy/Dockerfile"), str(ROOT / "deploy/Dockerfile.cuda"))
    assert out.returncode == 0, out.stdout + out.stderr
    careless = tmp_path / "Dockerfile"  # and it does fail a careless one
    careless.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y gcc\nRUN pip install torch\n")
    out = run_tool(tools, "hadolint", "--no-color", str(careless))
    assert out.returncode == 1 and {"DL3007", "DL3008", "DL3013"} <= set(re.findall(r"DL\d+", out.stdout)), out.stdout


# --- every pod's command line, through the real parsers -----------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_flags_are_what_dsv3_serve_accepts(overlay, tmp_path):
    """Rank 0's flags parse, pass `dsv3 serve`'s own checks (key file, TLS pair, audit log), and the probes,
    ports, Prometheus annotations and grace period match them."""
    from dsv3.commands.serve import build_config
    from dsv3.serve.app import create_app

    objs = rendered(overlay)
    servers = [p for p in pods(objs) if p.statefulset["metadata"]["name"] == "dsv3"]
    assert len(servers) == 1
    pod = servers[0]
    args = serve_args(pod, tmp_path)
    config = build_config(args)
    try:
        assert config.keys.enabled and config.audit is not None and args.tls_certfile and args.tls_keyfile
        app = create_app(config, lambda: None)
        while not hasattr(app, "routes"):  # middleware wrapping the FastAPI app
            app = app.app
        routes = {r.path for r in app.routes}
    finally:
        config.audit.close()
    c, spec = pod.container, pod.spec
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["https"] == args.port and args.host == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] in routes and get["path"] == "/health"
        assert ports[get["port"]] == args.port and get["scheme"] == "HTTPS"
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 3600  # an hour to load
    ann = pod.statefulset["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/path"] in routes and ann["prometheus.io/path"] == "/metrics"
    assert int(ann["prometheus.io/port"]) == args.port and ann["prometheus.io/scheme"] == "https"
    assert spec["terminationGracePeriodSeconds"] == (c["lifecycle"]["preStop"]["sleep"]["seconds"] + args.grace_period
                                                     + SHUTDOWN_MARGIN)
    svc = find(objs, "Service", "dsv3")[0]
    assert all(sp["targetPort"] in ports and ports[sp["targetPort"]] == args.port for sp in svc["spec"]["ports"])
    netpol = find(objs, "NetworkPolicy", "dsv3")[0]
    assert [p["port"] for rule in netpol["spec"]["ingress"] for p in rule["ports"]] == [args.port]
    assert netpol["spec"]["egress"] == []  # nothing leaves: dsv3 serve downloads nothing at run time
    ing = find(objs, "Ingress", "dsv3")[0]
    assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTPS"
    limit = ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert int(limit.rstrip("m")) << 20 == args.max_body_bytes
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "dsv3" and backend["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_hardened(overlay):
    """Non-root (the image's user), read-only root filesystem, no privilege escalation, no capabilities,
    seccomp RuntimeDefault, no service-account token, requests = limits (and OMP threads = CPUs)."""
    from deploy_kit import DEPLOY, dockerfile_instructions

    user = dict(dockerfile_instructions(DEPLOY / "Dockerfile"))["USER"].split(":")
    for pod in pods(rendered(overlay)):
        ps, cs = pod.spec["securityContext"], pod.container["securityContext"]
        assert ps["runAsNonRoot"] and [str(ps["runAsUser"]), str(ps["runAsGroup"])] == user
        assert ps["seccompProfile"]["type"] == "RuntimeDefault"
        assert cs["readOnlyRootFilesystem"] and cs["allowPrivilegeEscalation"] is False and not cs.get("privileged")
        assert cs["capabilities"]["drop"] == ["ALL"] and "add" not in cs["capabilities"]
        assert pod.spec["automountServiceAccountToken"] is False and pod.spec["enableServiceLinks"] is False
        for v in pod.spec["volumes"]:
            assert set(v) & {"secret", "persistentVolumeClaim", "emptyDir"}, f"{pod.name}: volume {v['name']}"
        assert "/tmp" in pod.mounts()  # HOME and caches, with a read-only root
        res = pod.container["resources"]
        assert res["requests"] == res["limits"]
        assert int(pod.env["OMP_NUM_THREADS"]) * ranks_in_pod(pod) == int(res["limits"]["cpu"])


def ranks_in_pod(pod) -> int:
    if pod.torchrun is not None:
        return int(pod.torchrun.nproc_per_node)
    args = build_parser().parse_args([a for a in pod.serve_argv if not a.startswith("--model=")])
    return max(args.tensor_parallel_size, args.expert_parallel_size)


def test_gpus_per_pod_match_the_ranks():
    for overlay in ("gpu", "multinode"):
        for pod in pods(rendered(overlay)):
            assert int(pod.container["resources"]["limits"]["nvidia.com/gpu"]) == ranks_in_pod(pod)
            assert pod.spec["nodeSelector"]["nvidia.com/gpu.present"] == "true"
            assert pod.mounts()["/dev/shm"]["volume"]["emptyDir"]["medium"] == "Memory"
    for pod in pods(rendered("cpu")):
        assert "nvidia.com/gpu" not in pod.container["resources"]["limits"]


def test_multinode_group_is_one_torchrun_world(tmp_path):
    """Leader and workers: the same model, TP, EP and dtype; node ranks 0..NNODES-1 exactly once (the worker's
    from its pod-index label); one rendezvous address, the leader's stable DNS name on the headless Service."""
    objs = rendered("multinode")
    group = pods(objs)
    assert all(p.torchrun is not None for p in group)
    nnodes = {int(p.torchrun.nnodes) for p in group}
    assert len(nnodes) == 1
    nnodes = nnodes.pop()
    assert sorted(p.torchrun.node_rank for p in group) == list(range(nnodes))
    for p in group:
        if p.statefulset["metadata"]["name"] != "dsv3":
            assert p.torchrun.node_rank == int(p.env["NODE_RANK"]) == p.ordinal  # pod-index label = node rank
    leader = next(p for p in group if p.torchrun.node_rank == 0)
    assert leader.statefulset["metadata"]["name"] == "dsv3"
    headless = find(objs, "Service", leader.statefulset["spec"]["serviceName"])[0]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    for p in group:
        assert p.statefulset["spec"]["serviceName"] == headless["metadata"]["name"]
        assert p.torchrun.master_addr == f"dsv3-0.{headless['metadata']['name']}"
        assert p.torchrun.master_port == headless["spec"]["ports"][0]["port"]
        assert p.torchrun.module and p.torchrun.training_script == "dsv3" and p.torchrun.rdzv_backend == "static"
        # torchrun passes SIGTERM on, then waits --shutdown-timeout before SIGKILL: rank 0 needs its grace period
        grace = build_parser().parse_args([a for a in leader.serve_argv if not a.startswith("--model=")]).grace_period
        assert p.torchrun.shutdown_timeout == grace + SHUTDOWN_MARGIN
        assert p.spec["terminationGracePeriodSeconds"] == (leader.container["lifecycle"]["preStop"]["sleep"]["seconds"]
                                                           + p.torchrun.shutdown_timeout)
    layouts = set()
    for p in group:
        a = serve_args(p, tmp_path)
        layouts.add((a.model.name, a.tensor_parallel_size, a.expert_parallel_size, a.dtype))
        assert a.tensor_parallel_size == nnodes * int(p.torchrun.nproc_per_node)
    assert len(layouts) == 1, layouts
    workers = find(objs, "StatefulSet", "dsv3-worker")[0]["spec"]
    assert workers["replicas"] == nnodes - 1 and workers["ordinals"]["start"] == 1
    assert not find(objs, "HorizontalPodAutoscaler")  # a TP group is not scaled pod by pod
    svc = find(objs, "Service", "dsv3")[0]  # clients reach rank 0 only
    assert svc["spec"]["selector"].items() <= leader.statefulset["spec"]["template"]["metadata"]["labels"].items()
    for p in group:
        if p is not leader:
            assert not svc["spec"]["selector"].items() <= p.statefulset["spec"]["template"]["metadata"]["labels"].items()
    ranks = find(objs, "NetworkPolicy", "dsv3-ranks")[0]["spec"]
    sel = ranks["podSelector"]["matchLabels"]
    assert all(sel.items() <= p.statefulset["spec"]["template"]["metadata"]["labels"].items() for p in group)


def test_autoscaler_and_disruption_budget_target_the_server():
    for overlay in ("cpu", "gpu"):
        objs = rendered(overlay)
        hpa = find(objs, "HorizontalPodAutoscaler", "dsv3")[0]["spec"]
        ref = hpa["scaleTargetRef"]
        target = find(objs, ref["kind"], ref["name"])[0]
        assert "replicas" not in target["spec"]  # the HPA owns the count; applying the kit must not reset it
        server = next(p for p in pods(objs) if p.statefulset is target)
        args = build_parser().parse_args(server.serve_argv)
        names = {m["pods"]["metric"]["name"]: float(m["pods"]["target"]["averageValue"]) for m in hpa["metrics"]}
        assert set(names) == {"dsv3_num_requests_waiting", "dsv3_num_requests_running"}
        assert 1 <= names["dsv3_num_requests_running"] <= args.max_num_seqs
        assert hpa["minReplicas"] <= hpa["maxReplicas"]
        pdb = find(objs, "PodDisruptionBudget", "dsv3")[0]["spec"]
        assert pdb["selector"]["matchLabels"].items() <= target["spec"]["template"]["metadata"]["labels"].items()
        assert pdb["maxUnavailable"] == 1


def test_extras_refer_to_the_kit():
    """ServiceMonitor (a CRD: no schema to validate against) scrapes the Service's port with TLS; the
    Certificate fills the Secret the pods mount; the adapter rule serves the HPA's names."""
    objs = rendered("cpu")
    svc = find(objs, "Service", "dsv3")[0]
    sm = kustomize_lite.load_docs(K8S / "extras" / "servicemonitor.yaml")[0]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert not sm["spec"]["selector"]["matchLabels"].items() <= find(objs, "Service", "dsv3-ranks")[0]["metadata"]["labels"].items()
    ep = sm["spec"]["endpoints"][0]
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]} and ep["scheme"] == "https" and ep["path"] == "/metrics"
    cert = kustomize_lite.load_docs(K8S / "extras" / "certificate.yaml")[0]
    secrets = {v["secret"]["secretName"] for p in pods(objs) for v in p.spec["volumes"] if "secret" in v}
    assert cert["spec"]["secretName"] in secrets and ep["tlsConfig"]["ca"]["secret"]["name"] == cert["spec"]["secretName"]
    assert f"dsv3.{svc['metadata']['namespace']}.svc" in cert["spec"]["dnsNames"] and ep["tlsConfig"]["serverName"] in cert["spec"]["dnsNames"]
    assert example_secret("dsv3-api-keys")["metadata"]["namespace"] == svc["metadata"]["namespace"]


# --- sizing: dsv3 plan wrote it, and the engine agrees ------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_sizing_is_what_dsv3_plan_emits(overlay, capsys, monkeypatch):
    """Each overlay's sizing.yaml is byte for byte the output of the `dsv3 plan` command on its first line."""
    from dsv3.cli import main

    text = (K8S / "overlays" / overlay / "sizing.yaml").read_text()
    first = text.splitlines()[0]
    assert first.startswith("# Generated by: dsv3 plan ")
    monkeypatch.chdir(ROOT)
    assert main(shlex.split(first.removeprefix("# Generated by: dsv3 "))) == 0
    assert capsys.readouterr().out == text


def test_cache_flag_gives_the_engine_exactly_the_blocks_it_can_use():
    """The plan's --kv-cache-memory for the CPU overlay, given to a real engine on the embedded model, yields the
    engine's own 'enough' block count (max_num_seqs full-length sequences, plus one): no fewer, no more."""
    from dsv3.io.load import load_model
    from dsv3.engine import EngineConfig, LLMEngine
    from dsv3.io.paths import default_model_dir
    from dsv3.io.tokenizer import Tokenizer

    pod = next(p for p in pods(rendered("cpu")) if p.statefulset["metadata"]["name"] == "dsv3")
    args = build_parser().parse_args(pod.serve_argv)
    model = load_model(default_model_dir(), dtype=args.dtype)
    engine = LLMEngine(model, Tokenizer.from_dir(default_model_dir()),
                       EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                                    kv_cache_memory=args.kv_cache_memory << 20, kv_cache_dtype=args.kv_cache_dtype))
    blocks = args.max_num_seqs * math.ceil(args.max_model_len / 16) + 1
    assert engine.block_manager.num_blocks == blocks
    smaller = LLMEngine(model, Tokenizer.from_dir(default_model_dir()),
                        EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                                     kv_cache_memory=(args.kv_cache_memory - 1) << 20))
    assert smaller.block_manager.num_blocks < blocks  # the figure is tight


# --- the images: one install recipe, the README's -----------------------------------------------------------

def test_dockerfiles_install_with_the_makefile_recipe():
    """No version lives in a Dockerfile: each runs `make venv` (the recipe behind the README's `make run` /
    `make test`) with INSTALL=., so pyproject.toml's pins are the only ones; `make -n` shows what it runs."""
    import tomllib

    from deploy_kit import DEPLOY, dockerfile_instructions

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch=="))
    makefile = (ROOT / "Makefile").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    assert re.search(r"^run: \$\(STAMP\)", makefile, re.M) and re.search(r"^test: \$\(STAMP\)", makefile, re.M)
    assert re.search(r"^venv: \$\(STAMP\)", makefile, re.M)
    for name, index in (("Dockerfile", "https://download.pytorch.org/whl/cpu"), ("Dockerfile.cuda", None)):
        text = (DEPLOY / name).read_text()
        assert "pip install" not in text and "==" not in text
        runs = [rest for ins, rest in dockerfile_instructions(DEPLOY / name) if ins == "RUN" and "make venv" in rest]
        assert len(runs) == 1
        make_argv = shlex.split(runs[0].split("&&")[0])
        assert make_argv[:2] == ["make", "venv"] and "INSTALL=." in make_argv
        assert ("TORCH_INDEX=" + index in make_argv) if index else not any(a.startswith("TORCH_INDEX") for a in make_argv)
        dry = subprocess.run(["make", "-n", "-B", *make_argv[1:]], cwd=ROOT, capture_output=True, text=True, check=True)
        pips = [line for line in dry.stdout.splitlines() if "/bin/pip install" in line]
        venv = next(a.split("=", 1)[1] for a in make_argv if a.startswith("VENV="))
        expect = [f"{venv}/bin/pip install -q ."]
        if index:
            expect.insert(0, f"{venv}/bin/pip install -q --index-url {index} '{torch_pin}'")
        assert pips == expect
    default = subprocess.run(["make", "-n", "-B", "venv"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert ".venv/bin/pip install -q -e '.[test]'" in default  # what the README's make test installs


def test_images_match_the_pods():
    """The runtime stage: non-root user, no compiler, prebuilt kernels where DSV3_KERNELS_PREBUILT points, the
    healthcheck script, and a CMD that dsv3's parser accepts on the port it EXPOSEs; tags are pyproject's version."""
    import tomllib

    from deploy_kit import DEPLOY, dockerfile_instructions
    from dsv3.kernels import X86_LEVELS

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name, tag in (("Dockerfile", version), ("Dockerfile.cuda", f"{version}-cuda")):
        ins = dockerfile_instructions(DEPLOY / name)
        froms = [i for i, (k, _) in enumerate(ins) if k == "FROM"]
        assert len(froms) == 2
        builder, runtime = ins[froms[0]:froms[1]], ins[froms[1]:]
        prebuild = next(shlex.split(r.split("&&")[1]) for k, r in builder if k == "RUN" and "prebuild" in r)
        out_dir, levels = prebuild[3], prebuild[4:]
        assert set(levels) <= set(X86_LEVELS) and "x86-64-v3" in levels
        env = " ".join(r for k, r in runtime if k == "ENV")
        assert f"DSV3_KERNELS_PREBUILT={out_dir}" in env
        assert not any(k == "RUN" and re.search(r"\b(gcc|cc|clang|build-essential)\b", r) for k, r in runtime)
        rt = dict(runtime)
        assert rt["USER"] == "10001:10001"
        assert "--from=builder /opt/dsv3 /opt/dsv3" in " ".join(r for k, r in runtime if k == "COPY")
        assert "deploy/healthcheck.py /opt/dsv3/healthcheck.py" in " ".join(r for k, r in runtime if k == "COPY")
        assert "/opt/dsv3/healthcheck.py" in rt["HEALTHCHECK"]
        entry, cmd = json.loads(rt["ENTRYPOINT"]), json.loads(rt["CMD"])
        assert entry == ["dsv3"]
        args = build_parser().parse_args(cmd)
        assert args.command == "serve" and int(rt["EXPOSE"]) == args.port and args.model is None  # embedded model
        overlays = [o for o in OVERLAYS if (o == "cpu") == (name == "Dockerfile")]
        for o in overlays:
            for pod in pods(rendered(o)):
                assert pod.container["image"] == f"dsv3:{tag}"
                assert pod.container["command"][0] in ("dsv3", "torchrun")
        assert f"-t dsv3:{tag} ." in (DEPLOY / name).read_text().splitlines()[0]  # the build command it documents


def test_make_deploy_tools_is_pinned():
    for f in ("requirements-tools.txt", "requirements-checkov.txt"):
        reqs = [line for line in (ROOT / "deploy" / f).read_text().splitlines() if line and not line.startswith("#")]
        assert reqs and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", r) for r in reqs), reqs


def test_worker_env_expansion_follows_the_kubelet():
    assert expand("--node-rank=$(NODE_RANK)", {"NODE_RANK": "3"}) == "--node-rank=3"
    assert expand("$$(NODE_RANK) $(UNSET)", {"NODE_RANK": "3"}) == "$(NODE_RANK) $(UNSET)"
    worker = next(p for p in pods(rendered("multinode")) if p.statefulset["metadata"]["name"] == "dsv3-worker")
    assert worker.env["NODE_RANK"] == str(worker.ordinal) and POD_INDEX in worker.container["env"][0]["valueFrom"]["fieldRef"]["fieldPath"]

