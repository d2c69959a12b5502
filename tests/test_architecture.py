"""The shape of the code: no import circles, layers that never reach into the engine, a root of public API only,
and model families that plug in through the registry alone."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from dsv3.models import registry

SRC = Path(__file__).parents[1] / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for p in (SRC / "dsv3").rglob("*.py"):
        name = ".".join(p.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(path: Path, name: str, mods: dict[str, Path]) -> set[str]:
    """Every dsv3 module `path` imports, at any depth (lazy imports inside functions count too);
    `from pkg import sub` counts as importing the submodule."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods}
            out |= subs
            if len(subs) < len(node.names):
                out.add(base)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant):
            out.add(node.args[0].value)
    return {m for m in out if m in mods and m != name}


def test_no_import_circles():
    mods = _modules()
    graph = {m: _imports(p, m, mods) for m, p in mods.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(u: str, stack: list[str]) -> None:
        state[u] = 1
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(" -> ".join(stack[stack.index(v):] + [u, v]))
            elif v not in state:
                visit(v, stack + [u])
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, cycles


def test_model_code_never_reaches_into_the_engine_or_the_native_build():
    mods = _modules()
    model_side = [m for m in mods if m.startswith(("dsv3.layers", "dsv3.models", "dsv3.attention"))]
    forbidden = ("dsv3.engine", "dsv3.serve", "dsv3.kernels", "dsv3.ops.plan", "dsv3.ops.reference", "dsv3.ops.schemas",
                 "dsv3.parallel.worker", "dsv3.train", "dsv3.lora", "dsv3.quant", "dsv3.commands")
    bad = {m: sorted(i for i in _imports(mods[m], m, mods) if i.startswith(forbidden)) for m in model_side}
    assert not {m: v for m, v in bad.items() if v}, bad


def test_the_root_holds_only_the_public_api_and_the_cli():
    assert sorted(p.name for p in (SRC / "dsv3").glob("*.py")) == \
        ["__init__.py", "__main__.py", "cli.py", "config.py", "errors.py", "llm.py"]


def test_registered_families_and_an_unknown_one():
    from dsv3.config import ModelConfig
    from dsv3.errors import ConfigError

    assert set(registry.supported()) >= {"deepseek_v3", "deepseek_v2", "kimi_k2"}
    with pytest.raises(ConfigError, match="unknown 'model_type' 'nope'.*deepseek_v3"):
        ModelConfig.from_dict({"model_type": "nope"})


@pytest.fixture
def toy_family():
    """A family registered by a test alone, nowhere else in dsv3: DeepSeek-V3's code with its own name,
    architecture and router defaults."""
    fam = registry.register(registry.ModelFamily(
        "toy_moe", "ToyForCausalLM", "dsv3.models.deepseek_v3.model:DeepseekV3ForCausalLM",
        "dsv3.models.deepseek_v3.weights", "dsv3.models.deepseek_v3.shard:parallelize",
        {"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": True}, ("o_proj",), ()))
    yield fam
    del registry.FAMILIES["toy_moe"]


def test_a_new_family_is_one_registration(toy_family, tmp_path):
    """Config defaults, the architecture name written back, loading, and serving through the engine: all from the
    registration."""
    import torch

    from dsv3.config import ModelConfig
    from dsv3.engine import EngineConfig, LLMEngine
    from dsv3.engine.sampling import SamplingParams
    from dsv3.io.load import load_model
    from dsv3.io.save import save_model
    from dsv3.io.tokenizer import Tokenizer
    from tiny_model import TINY, make_tiny_model_dir

    src = make_tiny_model_dir(tmp_path / "v3")
    raw = json.loads((src / "config.json").read_text())
    for k in ("scoring_func", "topk_method", "norm_topk_prob"):
        raw.pop(k, None)
    raw.update(model_type="toy_moe", n_group=1, topk_group=1)
    cfg = ModelConfig.from_dict(raw)
    assert (cfg.scoring_func, cfg.topk_method, cfg.norm_topk_prob) == ("softmax", "greedy", True)  # the family's defaults
    assert cfg.to_dict()["architectures"] == ["ToyForCausalLM"]
    model = toy_family.model_class()(cfg)
    model.init_weights(std=0.2)
    save_model(model, tmp_path / "toy", tokenizer_from=src)
    loaded = load_model(tmp_path / "toy", dtype="fp32", progress=False)
    ids = torch.arange(3, 12)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))
    engine = LLMEngine(loaded, Tokenizer.from_dir(tmp_path / "toy"), EngineConfig(max_model_len=64))
    out = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5 and TINY["model_type"] == "deepseek_v3"


def test_a_served_request_is_checked_once(tmp_path, monkeypatch):
    """The server admits (checks) a request once; the async front and the engine queue the `EngineRequest` it
    got as it is. An `EngineRequest` made by another engine is checked again (its vocabulary may differ)."""
    import dsv3.engine.llm_engine as engine_mod
    from dsv3.engine.outputs import EngineRequest
    from dsv3.engine.sampling import SamplingParams
    from serve_harness import client, serve, tiny_loader
    from tiny_model import make_tiny_model_dir

    calls = []
    real = engine_mod.LLMEngine.validate

    def counting(self, prompt, params):
        calls.append(prompt)
        return real(self, prompt, params)

    monkeypatch.setattr(engine_mod.LLMEngine, "validate", counting)
    model_dir = make_tiny_model_dir(tmp_path / "m")
    with serve(model_dir) as s, client(s) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert r.status_code == 200 and len(calls) == 1
        r = c.post("/v1/completions", json={"prompt": ["def f", "class A"], "max_tokens": 3, "stream": True})
        assert r.status_code == 200 and "[DONE]" in r.text and len(calls) == 3  # one per prompt
        served = s.engine.validate([5, 6, 7], SamplingParams(max_tokens=3))
    assert isinstance(served, EngineRequest) and served.prompt_ids == (5, 6, 7) and served.max_new_tokens == 3
    other, _ = tiny_loader(model_dir)()
    calls.clear()
    other.add_request("same", other.validate([5, 6, 7], SamplingParams(max_tokens=3)))
    assert len(calls) == 1  # queued as checked
    other.add_request("from-the-server", served)
    assert len(calls) == 2  # another engine's request: checked again
    foreign = EngineRequest(None, (5, 6, 10 ** 9), SamplingParams(max_tokens=3), 3, checked_by=s.engine)
    with pytest.raises(ValueError, match="must be in"):
        other.add_request("foreign", foreign)
    assert "foreign" not in other.requests and other.generate([[8, 9]], SamplingParams(max_tokens=2))[0].finished
