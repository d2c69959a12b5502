"""Several LoRA adapters served at once: engine batching, absorbed MLA decode with mixed adapters, HTTP.

Oracles are independent of the multi-adapter code: each adapter merged into a plain checkpoint
(`dsv3 merge`) and served by a plain engine, and merged kv_b_proj weights in plain MLA attention.
Both adapters target kv_b_proj (and the other MLA projections), so MLA's absorbed decode must
apply their deltas per sequence.
"""

from __future__ import annotations

import copy
import threading
import time

import httpx
import pytest
import torch

from dsv3.io.load import load_model
from dsv3.attention.backend import backend_for
from dsv3.engine import EngineConfig, LLMEngine
from dsv3.engine.runner import ModelRunner, StepItem
from dsv3.lora import LoRASpec, inject_lora, save_adapter, set_slot_ids
from dsv3.lora.layers import LoRALinear
from dsv3.lora.merge import merge_adapter
from dsv3.lora.multi import load_stacked
from dsv3.lora.slots import SlotBatch
from dsv3.engine.sampling import SamplingParams
from dsv3.serve import ServeConfig
from dsv3.io.tokenizer import Tokenizer
from serve_harness import serve, tiny_loader
from tiny_model import make_tiny_model_dir

MLA = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
ADAPTERS = {"alpha": (4, MLA), "beta": (8, ["kv_b_proj", "o_proj", "q_b_proj", "gate_proj", "up_proj"])}
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PROMPTS = [list(range(5, 45)), list(range(60, 83)), list(range(100, 137))]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model, two PEFT adapters on it (random non-zero B), and each adapter merged into a checkpoint."""
    root = tmp_path_factory.mktemp("lora_serve")
    base = make_tiny_model_dir(root / "base")
    adapters, merged = {}, {None: base}
    for i, (name, (r, targets)) in enumerate(ADAPTERS.items()):
        m = load_model(base, dtype="fp32", progress=False)
        spec = LoRASpec(r=r, lora_alpha=1.5 * r, target_modules=targets)
        inject_lora(m, spec)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        adapters[name] = str(save_adapter(m, root / name, spec))
        merged[name] = merge_adapter(base, adapters[name], root / f"merged-{name}", dtype="fp32", progress=False)
    return {"base": base, "adapters": adapters, "merged": merged, "tok": Tokenizer.from_dir(base), "refs": {}}


def engine(model_dir, tok, **kw) -> LLMEngine:
    cfg = EngineConfig(max_model_len=256, kv_cache_memory=8 << 20, **kw)
    return LLMEngine(load_model(model_dir, dtype="fp32", progress=False), tok, cfg)


def reference(world, adapter: str | None, prompt: list[int]):
    """Greedy output of the adapter merged into a plain checkpoint, served alone by a plain engine."""
    key = (adapter, tuple(prompt))
    if key not in world["refs"]:
        out = engine(world["merged"][adapter], world["tok"]).generate([prompt], GREEDY)[0].outputs[0]
        world["refs"][key] = (out.token_ids, out.text)
    return world["refs"][key]


def record_steps(eng: LLMEngine) -> list[set[int]]:
    """Spy on the runner: the adapter ids present in each model step."""
    steps: list[set[int]] = []
    inner = eng.runner.execute

    def execute(items):
        steps.append({it.adapter for it in items})
        return inner(items)
    eng.runner.execute = execute
    return steps


@pytest.mark.parametrize("budget", [2048, 24])  # 24: prompts are prefilled in chunks over several steps
def test_two_adapters_and_base_share_steps_and_each_equals_serving_it_alone(world, budget):
    eng = engine(world["base"], world["tok"], lora_adapters=world["adapters"], max_num_batched_tokens=budget)
    steps = record_steps(eng)
    names = ["alpha", "beta", None]
    for k, (name, prompt) in enumerate(zip(names, PROMPTS)):
        eng.add_request(f"r{k}", prompt, GREEDY, adapter_id=eng.adapter_id(name))
    done = {}
    while eng.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0].token_ids for o in eng.step() if o.finished})
    together = [s for s in steps if s == {0, 1, 2}]
    assert len(together) >= GREEDY.max_tokens - 1  # every decode step ran all three adapters in one batch
    if budget == 2048:
        assert all(s == {0, 1, 2} for s in steps)
    refs = [reference(world, name, prompt)[0] for name, prompt in zip(names, PROMPTS)]
    assert [done[f"r{k}"] for k in range(3)] == refs
    same_prompt = [reference(world, name, PROMPTS[0])[0] for name in names]  # the adapters really differ
    assert len({tuple(t) for t in same_prompt}) == 3


def test_mtp_speculation_with_adapters_stays_exact(world):
    """The MTP module drafts on the adapted hidden states; the adapted main model verifies every draft."""
    eng = engine(world["base"], world["tok"], lora_adapters=world["adapters"], num_speculative_tokens=2)
    outs = eng.generate([PROMPTS[0]] * 3, GREEDY, adapter=["alpha", "beta", None])
    assert eng.stats["spec_draft_tokens"] > 0
    assert [o.outputs[0].token_ids for o in outs] == [reference(world, n, PROMPTS[0])[0] for n in ("alpha", "beta", None)]


def stacked_model(world):
    m = load_model(world["base"], dtype="fp32", progress=False)
    load_stacked(m, list(world["adapters"].values()))
    return m.eval()


@torch.no_grad()
def test_absorbed_attention_with_mixed_slots_equals_merged_kv_b(world):
    """q_lat += s(q_nope·B_UK)A, out += s(o_lat·Aᵀ)B_UVᵀ per slot equals plain attention with W + sBA merged."""
    mla = stacked_model(world).model.layers[1].self_attn
    assert isinstance(mla.kv_b_proj, LoRALinear)
    g = torch.Generator().manual_seed(0)
    B, S, H = 3, 12, mla.n_heads
    q_nope, q_pe = torch.randn(B, 1, H, mla.nope_dim, generator=g), torch.randn(B, 1, H, mla.rope_dim, generator=g)
    kv = torch.randn(B, S, mla.kv_lora_rank + mla.rope_dim, generator=g)
    slots = SlotBatch([1, -1, 0])
    attn = backend_for("cpu")
    got = attn.absorbed(mla, q_nope, q_pe, kv, None, slots)
    plain = attn.absorbed(mla, q_nope, q_pe, kv, None, SlotBatch([-1, -1, -1]))
    for b, slot in enumerate([1, -1, 0]):
        oracle = copy.deepcopy(mla)
        w = mla.kv_b_proj.base_layer.weight + (mla.kv_b_proj.delta_weight(slot) if slot >= 0 else 0)
        oracle.kv_b_proj = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        oracle.kv_b_proj.weight.copy_(w)
        want = attn.expanded(oracle, q_nope[b:b + 1], q_pe[b:b + 1], kv[b:b + 1], None)
        assert (got[b:b + 1] - want).abs().max() <= 1e-5, b
        if slot >= 0:
            assert (plain[b] - want[0]).abs().max() > 1e-3  # the adapter's kv_b delta matters here
    expanded = attn.expanded(mla, q_nope, q_pe, kv, None, slots)  # the LoRALinear's own per-slot path
    assert (expanded - got).abs().max() <= 1e-5


@torch.no_grad()
def test_mixed_decode_step_equals_full_recompute(world):
    """One engine step decoding three sequences (adapters 1, 2, base) absorbed = full forward, fp32, ≤ 1e-5."""
    model = stacked_model(world)
    runner = ModelRunner(model, num_blocks=8, block_size=16)
    ids = torch.randint(3, 300, (3, 20), generator=torch.Generator().manual_seed(1))
    tables, adapters = [[0, 1], [2, 3], [4, 5]], [1, 2, 0]
    _, prefill = runner.execute([StepItem(ids[b, :19].tolist(), 0, tables[b], sample=True, adapter=adapters[b]) for b in range(3)])
    _, decode = runner.execute([StepItem([int(ids[b, 19])], 19, tables[b], sample=True, adapter=adapters[b]) for b in range(3)])
    set_slot_ids(model, torch.tensor([0, 1, -1]))
    full = model(ids)
    set_slot_ids(model, None)
    assert (prefill - full[:, 18]).abs().max() <= 1e-5
    assert (decode - full[:, 19]).abs().max() <= 1e-5
    base = model(ids)[:, 19]  # without slot ids a served stack is the base model
    assert (base[2] - full[2, 19]).abs().max() <= 1e-5 and (base[:2] - full[:2, 19]).abs().max() > 1e-2
    for layer in model.model.layers:  # the same step with kv_b_proj's adapters skipped in absorbed decode differs
        layer.self_attn.kv_b_proj.lora_terms = lambda slots, rows: []
    _, skipped = runner.execute([StepItem([int(ids[b, 19])], 19, tables[b], sample=True, adapter=adapters[b]) for b in range(3)])
    assert (skipped[:2] - full[:2, 19]).abs().max() > 1e-3


# ---- HTTP ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def srv(world):
    config = ServeConfig(served_model_name="tiny", lora_names=list(world["adapters"]))
    with serve(world["base"], config, loader=tiny_loader(world["base"], lora_adapters=world["adapters"])) as s:
        yield s


def complete(srv, model: str, prompt: list[int]) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": GREEDY.max_tokens, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        return c.post("/v1/completions", json=body)


def test_http_three_models_in_one_batch(world, srv):
    eng, front = srv.engine, srv.state.front
    steps = record_steps(eng)
    inner = eng.step

    def step():  # hold the first step until all three requests are queued, so the batch is deterministic
        deadline = time.monotonic() + 20
        while len(eng.requests) < 3 and time.monotonic() < deadline:
            front._drain_inbox()
            time.sleep(0.01)
        return inner()
    eng.step = step
    results: dict[str, httpx.Response] = {}
    threads = [threading.Thread(target=lambda m=m: results.__setitem__(m, complete(srv, m, PROMPTS[0])))
               for m in ("alpha", "beta", "tiny")]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        del eng.step, eng.runner.execute  # back to the class methods
    assert steps[0] == {0, 1, 2} and sum(s == {0, 1, 2} for s in steps) >= GREEDY.max_tokens
    for model, adapter in (("alpha", "alpha"), ("beta", "beta"), ("tiny", None)):
        r = results[model]
        assert r.status_code == 200 and r.json()["model"] == model
        assert r.json()["choices"][0]["text"] == reference(world, adapter, PROMPTS[0])[1]


def test_http_models_list_and_unknown_model(srv):
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        data = c.get("/v1/models").json()["data"]
        r = c.post("/v1/chat/completions", json={"model": "gamma", "messages": [{"role": "user", "content": "hi"}]})
    assert [(d["id"], d["parent"]) for d in data] == [("tiny", None), ("alpha", "tiny"), ("beta", "tiny")]
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["type"] == "not_found_error" and "gamma" in err["message"]


def test_http_prefix_cache_keeps_adapters_apart(world, srv):
    bm, prompt = srv.engine.block_manager, list(range(200, 240))  # 40 tokens: two full 16-token blocks
    assert complete(srv, "alpha", prompt).status_code == 200
    hits = bm.prefix_hits
    r = complete(srv, "beta", prompt)
    assert bm.prefix_hits == hits  # alpha's blocks are not beta's
    assert r.json()["choices"][0]["text"] == reference(world, "beta", prompt)[1]
    assert complete(srv, "alpha", prompt).status_code == 200
    assert bm.prefix_hits == hits + 32  # the same adapter does hit


# ---- CLI ----------------------------------------------------------------------------------------
def test_serve_lora_flags(world, tmp_path):
    from dsv3.cli import _Parser
    from dsv3.commands.serve import ServeError, build_config, register

    def config(*flags):
        p = _Parser(prog="dsv3")
        register(p.add_subparsers(parser_class=_Parser))
        return build_config(p.parse_args(["serve", "--model", str(world["base"]), "--served-model-name", "tiny", *flags]))

    a, b = world["adapters"]["alpha"], world["adapters"]["beta"]
    assert config("--lora", f"alpha={a}", "--lora", f"beta={b}").lora_names == ["alpha", "beta"]
    bad = [(["--lora", "alpha"], "NAME=PATH"), (["--lora", f"alpha={tmp_path}/none"], "does not exist"),
           (["--lora", f"x={a}", "--lora", f"x={b}"], "given twice"), (["--lora", f"tiny={a}"], "served model"),
           (["--lora", f"x={tmp_path}"], "adapter_config.json"),
           (["--lora", f"x={a}", "--tensor-parallel-size", "2"], "parallelism")]
    for flags, culprit in bad:
        with pytest.raises(ServeError, match=culprit) as e:
            config(*flags)
        assert "\n" not in str(e.value)


def test_adapters_over_a_quantized_base(world):
    """`--quantization int8` with `--lora`: the stacked adapters run over the packed base linears (LoRALinear
    wraps QuantLinear) and equal one adapter loaded on the same quantized model, decoded by the generator."""
    from dsv3.io.load import load_for_inference
    from reference_decoder import Generator
    from dsv3.lora import load_adapter
    from dsv3.quant.linear import QuantLinear

    tok = world["tok"]
    eng = LLMEngine(load_for_inference(world["base"], dtype="fp32", quantization="int8", progress=False), tok,
                    EngineConfig(max_model_len=256, kv_cache_memory=8 << 20, lora_adapters=world["adapters"]))
    assert isinstance(eng.model.model.layers[0].self_attn.kv_b_proj.base_layer, QuantLinear)
    outs = eng.generate([PROMPTS[1]] * 2, GREEDY, adapter=["beta", None])
    for out, name in zip(outs, ["beta", None]):
        single = load_for_inference(world["base"], dtype="fp32", quantization="int8", progress=False)
        if name is not None:
            load_adapter(single, world["adapters"][name])
        assert out.outputs[0].token_ids == Generator(single, tok, 256).complete(PROMPTS[1], GREEDY).token_ids
