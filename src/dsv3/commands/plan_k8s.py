"""`dsv3 plan --emit k8s`: the plan as a kustomize patch for deploy/k8s (replicas, devices, memory, serve flags).

The manifests in deploy/k8s pass the sizing to `dsv3 serve` through container environment variables
that their args reference as `$(VAR)` (Kubernetes expands them), so a strategic-merge patch that
sets those variables and the container resources resizes a deployment without restating its args.
The patch names the objects of deploy/k8s (namespace `dsv3`): StatefulSet `dsv3` (rank 0, the HTTP server),
StatefulSet `dsv3-worker` (the other pods of a multi-node group) and HorizontalPodAutoscaler `dsv3`.

Figures: cache memory is the plan's latent cache for the sequences that fit (plus one block, so the
engine allocates exactly the blocks they can use); CPU pods ask for the plan's memory per rank times
the ranks they run; GPU pods ask for `--host-memory-per-rank` of host memory per GPU (the interpreter,
CUDA's host allocations; checkpoint pages are reclaimable file cache) and the plan's device memory
is the GPUs' own, checked by the `--device-memory` verdict.
"""

from __future__ import annotations

import argparse
import math
import shlex

import yaml

from dsv3.errors import DSV3Error

TARGETS = ("cpu", "gpu", "multinode")
BLOCK = 16  # the engine's block size (EngineConfig.block_size)
STEP_TOKENS = 2048  # dsv3 serve's tokens per engine step (EngineConfig.max_num_batched_tokens)
NAMESPACE = "dsv3"  # the kit's namespace; an overlay's `namespace:` moves everything, patches included
WAITING_PER_POD = 2  # HPA: scale out once more than this many requests wait per pod on average
RUNNING_SHARE = 0.75  # ... or once this share of --max-num-seqs runs per pod on average


class EmitError(DSV3Error):
    """A plan that cannot be turned into manifests."""


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("manifests (--emit k8s)")
    g.add_argument("--emit", choices=("text", "k8s"), default="text",
                   help="k8s: print a kustomize patch for deploy/k8s/overlays/TARGET/sizing.yaml instead of the report")
    g.add_argument("--target", choices=TARGETS, default="gpu",
                   help="cpu: one pod of CPU ranks; gpu: one pod of --devices GPUs; multinode: --devices GPUs in pods "
                        "of --devices-per-pod (torchrun across pods)")
    g.add_argument("--devices-per-pod", type=int, default=None, metavar="N", help="GPUs per pod for multinode (a node's GPUs)")
    g.add_argument("--cpus-per-rank", type=int, default=4, metavar="N", help="CPU cores per rank (OMP_NUM_THREADS)")
    g.add_argument("--host-memory-per-rank", type=int, default=16, metavar="GIB", help="host memory per GPU rank, in GiB")
    g.add_argument("--replicas", type=int, default=2, help="HPA minimum replicas (cpu, gpu)")
    g.add_argument("--max-replicas", type=int, default=4, help="HPA maximum replicas (cpu, gpu)")


def command_line(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The `dsv3 plan` command that reproduces `args` (options at their defaults are left out, but --target)."""
    out = ["dsv3", "plan"]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest)
        if value == action.default and action.dest != "target":
            continue
        flag = action.option_strings[-1]
        text = f"{value:g}" if isinstance(value, float) else str(value)
        out += [flag] if isinstance(action, argparse._StoreTrueAction) else [flag, text]
    return shlex.join(out)


def check(args: argparse.Namespace) -> int:
    """Validate the k8s options; ranks per pod."""
    for name in ("cpus_per_rank", "host_memory_per_rank", "replicas", "max_replicas"):
        if getattr(args, name) < 1:
            raise EmitError(f"--{name.replace('_', '-')} must be a positive integer")
    if args.max_replicas < args.replicas:
        raise EmitError("--max-replicas must be at least --replicas")
    if args.max_num_batched_tokens != STEP_TOKENS:
        raise EmitError(f"dsv3 serve steps {STEP_TOKENS} tokens; plan with the default --max-num-batched-tokens")
    per_pod = args.devices_per_pod
    if args.target != "multinode":
        if per_pod is not None:
            raise EmitError("--devices-per-pod applies to --target multinode only")
        return args.devices
    if per_pod is None or per_pod < 1:
        raise EmitError("--target multinode needs --devices-per-pod N (the GPUs of one node)")
    if args.devices <= per_pod or args.devices % per_pod:
        raise EmitError(f"--devices {args.devices} must be a multiple of --devices-per-pod {per_pod} above it "
                        "(a single pod is --target gpu)")
    return per_pod


def _gib(n: float) -> str:
    return f"{math.ceil(n / 2**30)}Gi"


def _container(env: dict[str, str], resources: dict) -> dict:
    return {"name": "dsv3", "env": [{"name": k, "value": v} for k, v in env.items()], "resources": resources}


def _statefulset(name: str, container: dict, replicas: int | None = None) -> dict:
    spec: dict = {"template": {"spec": {"containers": [container]}}}
    if replicas is not None:
        spec = {"replicas": replicas, **spec}
    return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


def patch(args: argparse.Namespace, p, cfg, dtype: str, seqs: int, comments: list[str]) -> str:
    """The YAML documents for `args.target`, after `comments` (as # lines)."""
    ranks = check(args)
    ep = args.devices if cfg.n_routed_experts and cfg.n_routed_experts % args.devices == 0 else 1
    cache_mib = math.ceil((seqs * p.per_sequence + BLOCK * p.cache_per_token) / 2**20)
    env = {
        "DSV3_TENSOR_PARALLEL_SIZE": str(args.devices),
        "DSV3_EXPERT_PARALLEL_SIZE": str(ep),
        "DSV3_DTYPE": dtype,
        "DSV3_MAX_MODEL_LEN": str(p.max_model_len),
        "DSV3_MAX_NUM_SEQS": str(seqs),
        "DSV3_KV_CACHE_DTYPE": args.kv_cache_dtype,
        "DSV3_KV_CACHE_MEMORY": str(cache_mib),
        "OMP_NUM_THREADS": str(args.cpus_per_rank),
    }
    cpu = str(ranks * args.cpus_per_rank)
    if args.target == "cpu":
        mem = _gib(ranks * p.needed())
        resources = {"requests": {"cpu": cpu, "memory": mem}, "limits": {"cpu": cpu, "memory": mem}}
    else:
        mem = f"{ranks * args.host_memory_per_rank}Gi"
        gpus = str(ranks)
        resources = {"requests": {"cpu": cpu, "memory": mem, "nvidia.com/gpu": gpus},
                     "limits": {"cpu": cpu, "memory": mem, "nvidia.com/gpu": gpus}}
    docs = []
    if args.target == "multinode":
        pods = args.devices // ranks
        env = {**env, "NNODES": str(pods), "NPROC_PER_NODE": str(ranks)}
        docs.append(_statefulset("dsv3", _container(env, resources)))
        docs.append(_statefulset("dsv3-worker", _container(env, resources), replicas=pods - 1))
    else:
        docs.append(_statefulset("dsv3", _container(env, resources)))
        running = max(1, math.floor(RUNNING_SHARE * seqs))
        docs.append({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "dsv3", "namespace": NAMESPACE},
            "spec": {"minReplicas": args.replicas, "maxReplicas": args.max_replicas, "metrics": [
                {"type": "Pods", "pods": {"metric": {"name": "dsv3_num_requests_waiting"},
                                          "target": {"type": "AverageValue", "averageValue": str(WAITING_PER_POD)}}},
                {"type": "Pods", "pods": {"metric": {"name": "dsv3_num_requests_running"},
                                          "target": {"type": "AverageValue", "averageValue": str(running)}}},
            ]}})
    head = "".join(f"# {line}".rstrip() + "\n" for line in comments)
    return head + yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True)
