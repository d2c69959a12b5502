"""A small kustomize: exactly the features deploy/k8s uses, so tests can render the overlays without kubectl.

Supported: `resources` (files and kustomization directories), `patches` (strategic-merge patch files, and
JSON 6902 patch files with a `target`), `namespace` and `images`. Anything else in a kustomization is an
error, so the kit cannot grow a feature this renderer would silently ignore. Where kubectl is installed,
tests/test_deploy_manifests.py checks that `kubectl kustomize` renders the same objects.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KNOWN = {"apiVersion", "kind", "resources", "patches", "namespace", "images"}
# Strategic-merge keys of the lists the kit patches (Kubernetes' patchMergeKey for each field)
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "imagePullSecrets": "name", "tolerations": None}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "CustomResourceDefinition", "PriorityClass"}


class KustomizeError(Exception):
    pass


def load_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _merge_key(field: str, items: list) -> str | None:
    if field == "ports":  # containerPort in a container, port in a Service
        return "containerPort" if any(isinstance(i, dict) and "containerPort" in i for i in items) else "port"
    return MERGE_KEYS.get(field)


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """Kubernetes' strategic merge patch for maps and keyed lists (null deletes a key; other lists replace)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        if "$patch" in patch:
            raise KustomizeError(f"$patch directives are not supported ({field})")
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list):
        key = _merge_key(field, base + patch)
        if key is None:
            return copy.deepcopy(patch)
        out = list(base)
        for item in patch:
            at = next((i for i, b in enumerate(out) if b.get(key) == item.get(key)), None)
            if at is None:
                out.append(copy.deepcopy(item))
            else:
                out[at] = strategic_merge(out[at], item, field)
        return out
    return copy.deepcopy(patch)


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def json_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 add / replace / remove."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if op["op"] == "add":
            if isinstance(node, list):
                node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
            else:
                node[last] = copy.deepcopy(op["value"])
        elif op["op"] == "replace":
            node[int(last) if isinstance(node, list) else last] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del node[int(last) if isinstance(node, list) else last]
        else:
            raise KustomizeError(f"JSON patch op {op['op']!r} is not supported")
    return doc


def _matches(res: dict, kind: str, name: str, namespace: str | None) -> bool:
    md = res.get("metadata", {})
    return res.get("kind") == kind and md.get("name") == name and (namespace is None or md.get("namespace") == namespace)


def _pod_specs(res: dict) -> list[dict]:
    tmpl = res.get("spec", {}).get("template", {}).get("spec")
    return [tmpl] if tmpl else []


def _split_image(image: str) -> tuple[str, str]:
    """(name, tag) of `registry/name:tag` (a digest counts as no tag)."""
    ref = image.split("@")[0]
    if ":" in ref.rsplit("/", 1)[-1]:
        name, tag = ref.rsplit(":", 1)
        return name, tag
    return ref, "latest"


def build(directory: Path) -> list[dict]:
    """The objects `kubectl kustomize directory` prints (same content; order and list order may differ)."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - KNOWN
    if unknown:
        raise KustomizeError(f"{directory}: unsupported kustomization fields {sorted(unknown)}")
    out: list[dict] = []
    for entry in k.get("resources", []):
        path = directory / entry
        out += build(path) if path.is_dir() else load_docs(path)
    for p in k.get("patches", []):
        docs = load_docs(directory / p["path"])
        if "target" in p:
            t = p["target"]
            hits = [i for i, r in enumerate(out) if _matches(r, t["kind"], t["name"], t.get("namespace"))]
            if not hits:
                raise KustomizeError(f"{p['path']}: no {t['kind']} {t['name']}")
            ops = docs[0] if len(docs) == 1 and isinstance(docs[0], list) else None
            if ops is None:
                raise KustomizeError(f"{p['path']}: a targeted patch must be a JSON 6902 list here")
            for i in hits:
                out[i] = json_patch(out[i], ops)
            continue
        for doc in docs:
            md = doc["metadata"]
            hits = [i for i, r in enumerate(out) if _matches(r, doc["kind"], md["name"], md.get("namespace"))]
            if len(hits) != 1:
                raise KustomizeError(f"{p['path']}: no unique {doc['kind']} {md['name']} to patch")
            out[hits[0]] = strategic_merge(out[hits[0]], doc)
    if "namespace" in k:
        for r in out:
            if r["kind"] == "Namespace":
                r["metadata"]["name"] = k["namespace"]
            elif r["kind"] not in CLUSTER_SCOPED:
                r["metadata"]["namespace"] = k["namespace"]
    for img in k.get("images", []):
        for r in out:
            for spec in _pod_specs(r):
                for c in spec.get("containers", []) + spec.get("initContainers", []):
                    name, tag = _split_image(c["image"])
                    if name == img["name"]:
                        new = img.get("newName", name)
                        c["image"] = f"{new}@{img['digest']}" if "digest" in img else f"{new}:{img.get('newTag', tag)}"
    return out


def normalized(objs: list[dict]) -> list[dict]:
    """Objects sorted by (kind, namespace, name), keyed lists sorted by key: for comparing two renderings."""
    def norm(x: Any, field: str = "") -> Any:
        if isinstance(x, dict):
            return {k: norm(v, k) for k, v in sorted(x.items())}
        if isinstance(x, list):
            items = [norm(v, field) for v in x]
            key = _merge_key(field, x) if field in MERGE_KEYS or field == "ports" else None
            return sorted(items, key=lambda i: str(i.get(key))) if key and all(isinstance(i, dict) for i in items) else items
        return x
    return sorted((norm(o) for o in objs),
                  key=lambda o: (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]))
