"""Adapters on disk in PEFT's format, so PEFT, vLLM, SGLang and LLaMA-Factory read ours and we read theirs.

A directory holds `adapter_config.json` (PEFT's `LoraConfig` fields, sorted keys) and
`adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight` [r, in] and
`.lora_B.weight` [out, r]. Routed experts are written per expert (`...mlp.experts.3.gate_proj.lora_A.weight`,
the transformers-v4 / vLLM layout, which PEFT on transformers v5 converts on load). We also read PEFT's
v5 `target_parameters` form, one stacked pair per fused parameter (`mlp.experts[.base_layer].lora_A.weight`,
A [E·r, in] expert-major, B [out, r·E] rank-major).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from dsv3.lora.apply import AdapterError, LoRASpec, lora_modules, mark_trainable, replace_module
from dsv3.lora.layers import EXPERT_PROJ, ExpertsLoRA, LoRALinear, is_adaptable_linear, lora_scaling
from dsv3.lora.targets import mlp_linears, scale_patterns, target_parameters, target_regex

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight$")
_PER_EXPERT = re.compile(r"^(.+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)$")
_FUSED = re.compile(r"^(.+\.mlp\.experts)(\.base_layer)?$")


def adapter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-named tensors of slot 0 of every adapter in the model."""
    out: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model):
        if isinstance(m, LoRALinear):
            out[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A[0]
            out[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B[0]
            continue
        if "gate_up_proj" in m.lora_A:
            raise AdapterError(f"{name} holds a fused gate_up_proj adapter (PEFT target_parameters); it can be merged but not re-saved per expert")
        for proj in m.lora_A:
            for j in range(m.lora_A[proj].shape[0]):
                out[f"{PREFIX}{name}.{j}.{proj}.lora_A.weight"] = m.lora_A[proj][j]
                out[f"{PREFIX}{name}.{j}.{proj}.lora_B.weight"] = m.lora_B[proj][j]
    return out


def save_adapter(model: torch.nn.Module, out_dir: str | Path, spec: LoRASpec, base_model: str | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` for the model's slot-0 adapters."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in adapter_tensors(model).items()}
    ranks, alphas = scale_patterns(model, spec)
    params = target_parameters(model)  # dense-MLP / shared-expert linears: see dsv3.lora.targets
    config = {
        "alpha_pattern": alphas, "auto_mapping": None, "base_model_name_or_path": base_model, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
        # PEFT wraps a target parameter only without dropout (an inference-time no-op anyway)
        "layers_to_transform": None, "lora_alpha": spec.alpha, "lora_bias": False, "lora_dropout": 0.0 if params else spec.lora_dropout,
        "modules_to_save": None, "peft_type": "LORA", "r": spec.r, "rank_pattern": ranks, "revision": None,
        "target_modules": target_regex(model, exclude=set(mlp_linears(model))), "target_parameters": params,
        "task_type": "CAUSAL_LM", "use_dora": False,
        "use_rslora": spec.use_rslora,
    }
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    return out


def read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{adapter_dir} has no {CONFIG_NAME}; it is not a PEFT adapter directory")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{path} has peft_type {cfg.get('peft_type')!r}; only LORA adapters are supported")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False), ("lora_bias", False), ("bias", "none"),
                    ("modules_to_save", None)):
        if cfg.get(key, ok) not in (ok, [], {}):
            raise AdapterError(f"{path}: {key}={cfg[key]!r} is not supported (only plain LoRA adapters load)")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise AdapterError(f"{path}: {key} must be a positive number, got {cfg.get(key)!r}")
    return cfg


def _alpha(cfg: dict, key: str) -> float:
    """lora_alpha, or the first alpha_pattern entry matching `key` as PEFT's `get_pattern_key` does."""
    for pattern, alpha in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return float(alpha)
    return float(cfg["lora_alpha"])


def _read_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = adapter_dir / WEIGHTS_NAME
    if not path.is_file():
        legacy = adapter_dir / "adapter_model.bin"
        if legacy.is_file():
            raise AdapterError(f"{legacy} is a pickle file, refused because loading it can run code; re-save it as safetensors")
        raise AdapterError(f"{adapter_dir} has no {WEIGHTS_NAME}")
    return load_file(str(path))


def read_pairs(adapter_dir: str | Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(adapter config, {module path: (lora_A, lora_B)}) with every tensor name checked."""
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in _read_tensors(adapter_dir).items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"adapter tensor {key!r} is not a LoRA A/B weight (embedding LoRA, biases and modules_to_save are unsupported)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    for path, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter module {path} has lora_{'A' if 'A' in ab else 'B'} but not its partner")
    return cfg, {path: (ab["A"], ab["B"]) for path, ab in sorted(pairs.items())}


def module_scaling(cfg: dict, path: str, r: int) -> float:
    return lora_scaling(_alpha(cfg, path), r, bool(cfg.get("use_rslora", False)))


def load_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> LoRASpec:
    """Load a PEFT LoRA adapter into slot 0 (wrapping the targeted modules first where needed)."""
    cfg, pairs = read_pairs(adapter_dir)
    experts: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    rs = cfg.get("use_rslora", False)
    for path, (a, b) in pairs.items():
        if (e := _PER_EXPERT.match(path)) is not None:
            experts.setdefault(e.group(1), {}).setdefault(e.group(3), {})[int(e.group(2))] = (a, b, _alpha(cfg, path))
        elif _FUSED.match(path) and not _is_linear(model, path):
            _load_fused(model, _FUSED.match(path).group(1), a, b, cfg, experts)
        else:
            _load_linear(model, path, a, b, module_scaling(cfg, path, a.shape[0]), cfg)
    for path, projs in experts.items():
        _load_experts(model, path, projs, rs)
    mark_trainable(model)
    return LoRASpec(r=int(cfg["r"]), lora_alpha=float(cfg["lora_alpha"]), lora_dropout=float(cfg.get("lora_dropout") or 0.0),
                    use_rslora=bool(rs), target_modules=sorted({p.rsplit(".", 1)[-1] for p in pairs}),
                    routed_experts=bool(experts))


def _is_linear(model: torch.nn.Module, path: str) -> bool:
    try:
        mod = model.get_submodule(path)
    except AttributeError:
        return False
    return isinstance(mod, LoRALinear) or is_adaptable_linear(mod)


def _module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise AdapterError(f"the adapter targets {path}, which this model does not have") from None


def _load_linear(model, path: str, a: torch.Tensor, b: torch.Tensor, scaling: float, cfg: dict) -> None:
    mod = _module(model, path)
    if not (isinstance(mod, LoRALinear) or is_adaptable_linear(mod)):
        raise AdapterError(f"the adapter targets {path}, which is a {type(mod).__name__}, not a linear layer")
    r = a.shape[0]
    if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != (r, mod.in_features) or tuple(b.shape) != (mod.out_features, r):
        raise AdapterError(f"adapter {path}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit a {mod.in_features}->{mod.out_features} linear")
    if not isinstance(mod, LoRALinear) or mod.r != r:
        base = mod.base_layer if isinstance(mod, LoRALinear) else mod
        mod = LoRALinear(base, r, scaling * r, float(cfg.get("lora_dropout") or 0.0))
        replace_module(model, path, mod)
    with torch.no_grad():
        mod.lora_A[0].copy_(a)
        mod.lora_B[0].copy_(b)
        mod.scaling[0] = scaling


def _load_fused(model, path: str, a: torch.Tensor, b: torch.Tensor, cfg: dict, experts: dict) -> None:
    """PEFT v5 `ParamWrapper` tensors: A [E·r, in] (expert-major), B [out, r·E] (rank-major)."""
    mod = _module(model, path)
    base = mod.base_layer if isinstance(mod, ExpertsLoRA) else mod
    E, two_im, D = base.gate_up_proj.shape
    proj = "gate_up_proj" if (a.shape[1], b.shape[0]) == (D, two_im) else "down_proj" if (a.shape[1], b.shape[0]) == (two_im // 2, D) else None
    if proj is None or a.shape[0] % E or b.shape[1] != a.shape[0]:
        raise AdapterError(f"adapter {path}: fused lora_A {list(a.shape)} / lora_B {list(b.shape)} fit neither gate_up_proj nor down_proj of {E} experts")
    r = a.shape[0] // E
    a_e = a.view(E, r, a.shape[1])
    b_e = b.view(b.shape[0], r, E).permute(2, 0, 1)
    experts.setdefault(path, {})[proj] = {j: (a_e[j], b_e[j], _alpha(cfg, f"{path}.{proj}")) for j in range(E)}


def _load_experts(model, path: str, projs: dict[str, dict[int, tuple]], use_rslora: bool) -> None:
    mod = _module(model, path)
    base = mod.base_layer if isinstance(mod, ExpertsLoRA) else mod
    E = base.gate_up_proj.shape[0]
    specs = {}
    for proj, per in projs.items():
        if sorted(per) != list(range(E)):
            raise AdapterError(f"adapter {path}.*.{proj} covers experts {sorted(per)[:4]}..., not all {E} experts")
        alphas = {v[2] for v in per.values()}
        r = per[0][0].shape[0]
        if len(alphas) > 1 or any(v[0].shape[0] != r for v in per.values()):
            raise AdapterError(f"adapter {path}.*.{proj}: experts differ in rank or alpha, which stacked experts cannot hold")
        specs[proj] = (r, lora_scaling(alphas.pop(), r, use_rslora))
    keep = dict(mod.scaling) if isinstance(mod, ExpertsLoRA) else {}
    specs = {**{p: (mod.lora_A[p].shape[1], keep[p]) for p in keep if p not in specs}, **specs}
    new = ExpertsLoRA(base, dict(sorted(specs.items(), key=lambda kv: list(EXPERT_PROJ).index(kv[0]))))
    if isinstance(mod, ExpertsLoRA):
        new.lora_dropout = mod.lora_dropout
    replace_module(model, path, new)
    with torch.no_grad():
        for proj, per in projs.items():
            a = torch.stack([per[j][0] for j in range(E)])
            b = torch.stack([per[j][1] for j in range(E)])
            if a.shape[1:] != new.lora_A[proj].shape[1:] or b.shape[1:] != new.lora_B[proj].shape[1:]:
                raise AdapterError(f"adapter {path}.*.{proj}: lora_A {list(a.shape[1:])} / lora_B {list(b.shape[1:])} do not fit the experts")
            new.lora_A[proj].copy_(a)
            new.lora_B[proj].copy_(b)
        for p in keep:
            if p not in specs:
                new.lora_A[p].copy_(mod.lora_A[p])
                new.lora_B[p].copy_(mod.lora_B[p])
