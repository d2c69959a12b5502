"""Native decode kernels (dsv3.kernels) against PyTorch computations of the same math."""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3 import kernels, ops
from dsv3.ops.forms import NativeExperts, NativeLinear
from dsv3.config import ModelConfig
from dsv3.models.deepseek_v3 import DeepseekV3ForCausalLM
from dsv3.attention.context import DenseLatentCache
from dsv3.layers.moe import Gate
from dsv3.quant import kernels as quant_kernels
from dsv3.quant.apply import quantize_model
from tiny_model import TINY

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


@pytest.fixture(autouse=True)
def _built():
    assert kernels.load(), "a C compiler is present, so the kernels must build"
    with torch.no_grad():  # the native kernels run without autograd
        yield


def kernels_off(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "load", lambda: False)


def per_module(monkeypatch) -> None:
    """No whole-step call: each module takes its own kernel (the path under a LoRA or a hook)."""
    monkeypatch.setattr(ops, "WHOLE_STEPS", False)


def count_native(monkeypatch) -> collections.Counter:
    """Calls of the native `dsv3::` ops, by name."""
    calls = collections.Counter()
    for name in ("rms_norm", "route_noaux", "linear", "mlp", "moe", "mla_decode", "decode_layers", "decode_step",
                 "mtp_step", "screened_greedy"):
        real = getattr(torch.ops.dsv3, name)
        monkeypatch.setattr(torch.ops.dsv3, name, lambda *a, _n=name, _r=real, **k: calls.update([_n]) or _r(*a, **k))
    return calls


def expert_ref(x, idx, wt, gu, dn):
    """Σ_k wt·down_e(silu(gate_e x)·up_e x) in float64, one (token, slot) at a time."""
    I = dn.shape[-1]
    y = torch.zeros(x.shape, dtype=torch.float64)
    for n in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[n, k])
            h = gu[e].double() @ x[n].double()
            y[n] += wt[n, k].double() * (dn[e].double() @ (torch.nn.functional.silu(h[:I]) * h[I:]))
    return y


@pytest.mark.parametrize("M", [1, 3, 8, 9, 64])
def test_moe_f32_matches_reference(M):
    """Token by token up to 8 rows (moe_lin), sorted by expert past that (moe_grouped); odd sizes hit every edge of
    the 4x4 blocks."""
    torch.manual_seed(M)
    E, D, I, K = 16, 98, 42, 4
    gu, dn = torch.randn(E, 2 * I, D) * 0.1, torch.randn(E, D, I) * 0.1
    x, wt = torch.randn(M, D), torch.rand(M, K)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(M)])
    y = ops.experts(x, idx, wt, NativeExperts(NativeLinear(0, gu), NativeLinear(0, gu), NativeLinear(0, dn)))
    torch.testing.assert_close(y.double(), expert_ref(x, idx, wt, gu, dn), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["step", "modules"])
def test_batched_decode_runs_natively_with_the_same_tokens(monkeypatch, parts, path):
    """16 requests decoding together (more rows than the per-row kernels take): each step one `decode_step` call
    (batch.c), or per module (LoRA, hooks) routed experts in one sorted call per layer and attention read from the
    paged cache (`mla_attend`); either way the greedy tokens picked by the bf16-screened head
    (`screened_greedy`), and the tokens of PyTorch's path."""
    from dsv3.engine import EngineConfig, LLMEngine
    from dsv3.engine.sampling import SamplingParams

    model, tok = parts
    prompts = [[3 + (5 * i + j) % 40 for j in range(2 + i)] for i in range(16)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    monkeypatch.setattr(ops, "bf16_arithmetic", lambda: True)  # the op runs anywhere; the engine asks the CPU
    if path == "modules":
        per_module(monkeypatch)
    native = count_native(monkeypatch)
    for name in ("mla_attend",):
        real = getattr(torch.ops.dsv3, name)
        monkeypatch.setattr(torch.ops.dsv3, name, lambda *a, _n=name, _r=real, **k: native.update([_n]) or _r(*a, **k))
    fast = [o.outputs[0].token_ids for o in LLMEngine(model, tok, EngineConfig()).generate(prompts, params)]
    if path == "step":  # 9 steps of 16 decodes, each one call; only the prefill step runs the modules
        assert native["decode_step"] >= 9 and native["moe"] <= 1 and not native["mla_attend"]
    else:
        assert native["moe"] >= 9 and native["mla_attend"] >= 9 * model.config.num_hidden_layers
    assert native["screened_greedy"] >= 10  # the prefill step's 16 rows too
    kernels_off(monkeypatch)
    assert fast == [o.outputs[0].token_ids for o in LLMEngine(model, tok, EngineConfig()).generate(prompts, params)]


@pytest.mark.parametrize("other", ["logprobs", "repetition_penalty", "temperature", "min_tokens"])
def test_a_step_with_a_request_that_reads_or_changes_logits_is_not_screened(monkeypatch, parts, other):
    """The screened head gives tokens, not logits: a step with one request that reads them (logprobs) or changes
    them (penalties, sampling, EOS banned below min_tokens) computes the fp32 logits of every row, and the greedy
    requests' tokens are those of a screened run."""
    from dsv3.engine import EngineConfig, LLMEngine
    from dsv3.engine.sampling import SamplingParams

    model, tok = parts
    monkeypatch.setattr(ops, "bf16_arithmetic", lambda: True)
    prompts = [[3 + (5 * i + j) % 40 for j in range(2 + i)] for i in range(12)]
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    odd = SamplingParams(max_tokens=8, **{"logprobs": dict(temperature=0, logprobs=2),
                                          "repetition_penalty": dict(temperature=0, repetition_penalty=1.3),
                                          "temperature": dict(temperature=0.8, seed=1),
                                          "min_tokens": dict(temperature=0, min_tokens=8)}[other])
    native = count_native(monkeypatch)
    alone = [o.outputs[0].token_ids for o in LLMEngine(model, tok, EngineConfig()).generate(prompts, greedy)]
    assert native["screened_greedy"] >= 8
    native.clear()
    outs = LLMEngine(model, tok, EngineConfig()).generate(prompts, [odd] + [greedy] * 11)
    assert not native["screened_greedy"]
    assert [o.outputs[0].token_ids for o in outs[1:]] == alone[1:]
    if other == "logprobs":
        assert len(outs[0].outputs[0].logprobs) == 8 and outs[0].outputs[0].token_ids == alone[0]


def test_linear_int8_and_moe_int8_match_dequantized_math():
    torch.manual_seed(0)
    q, s, x = torch.randint(-127, 128, (70, 48), dtype=torch.int8), torch.rand(70) * 0.01, torch.randn(2, 48)
    torch.testing.assert_close(ops.linear(x, NativeLinear(1, q, s)).double(), x.double() @ (q.double() * s.double()[:, None]).T,
                               atol=1e-5, rtol=1e-5)
    E, D, I, K = 8, 64, 24, 2
    g, u = torch.randint(-127, 128, (E, I, D), dtype=torch.int8), torch.randint(-127, 128, (E, I, D), dtype=torch.int8)
    d = torch.randint(-127, 128, (E, D, I), dtype=torch.int8)
    gs, us, ds = torch.rand(E, I) * 0.01, torch.rand(E, I) * 0.01, torch.rand(E, D) * 0.01
    x, wt, idx = torch.randn(3, D), torch.rand(3, K), torch.tensor([[0, 5], [7, 1], [5, 0]])
    y = ops.experts(x, idx, wt, NativeExperts(NativeLinear(1, g, gs), NativeLinear(1, u, us), NativeLinear(1, d, ds)))
    gu = torch.cat([g.double() * gs.double()[..., None], u.double() * us.double()[..., None]], dim=1)
    torch.testing.assert_close(y.double(), expert_ref(x, idx, wt, gu, d.double() * ds.double()[..., None]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("groups,topk_group,top_k", [(4, 2, 4), (1, 1, 2), (8, 3, 6)])
def test_router_matches_gate(monkeypatch, groups, topk_group, top_k):
    cfg = ModelConfig.from_dict({**TINY, "vocab_size": 64, "n_routed_experts": 32, "n_group": groups,
                                 "topk_group": topk_group, "num_experts_per_tok": top_k, "hidden_size": 48})
    torch.manual_seed(groups)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.3)
    gate.e_score_correction_bias.normal_(0, 0.2)
    x = torch.randn(5, 48)
    with torch.inference_mode():
        w, idx, scores = gate(x)
        kernels_off(monkeypatch)
        w_ref, idx_ref, scores_ref = gate(x)
    torch.testing.assert_close(scores, scores_ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(idx, idx_ref)  # same experts in the same (descending) order
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-5)


def count_mla_calls(monkeypatch) -> list:
    """Record what each native MLA call returned (None: the layer had no native form)."""
    out, real = [], ops.mla_decode
    monkeypatch.setattr(ops, "mla_decode", lambda *a: out.append(real(*a)) or out[-1])
    return out


@pytest.mark.parametrize("path", ["step", "modules"])
@pytest.mark.parametrize("q_lora_rank", [24, None])
@pytest.mark.parametrize("T", [1, 3])
def test_mla_kernel_matches_pytorch_with_padding_and_several_tokens(monkeypatch, q_lora_rank, T, path):
    """Batch 2 with a left-padded prompt (masked keys); T = 3 tokens per step (MTP verification) in the absorbed form."""
    cfg = ModelConfig.from_dict({**TINY, "vocab_size": 97, "q_lora_rank": q_lora_rank})
    torch.manual_seed(2)
    model = DeepseekV3ForCausalLM(cfg)
    model.init_weights(std=0.2)

    def run() -> torch.Tensor:
        cache = DenseLatentCache(cfg.num_hidden_layers, 2, 40, cfg.latent_dim, torch.float32, impl="absorb")
        ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
        mask = torch.ones(2, 9)
        mask[1, :4] = 0
        cache.set_padding(mask)
        pos = (mask.cumsum(-1) - 1).clamp(min=0).long()
        out = [model(ids, pos, cache)[:, -1]]
        for step in range(4):
            nxt = torch.randint(3, 97, (2, T), generator=torch.Generator().manual_seed(step + 1))
            cache.set_padding(torch.ones(2, T))
            out.append(model(nxt, pos[:, -1:] + 1 + T * step + torch.arange(T), cache).flatten(0, 1))
        return torch.cat(out)

    with torch.inference_mode():
        if path == "modules":
            per_module(monkeypatch)
        calls, native = count_mla_calls(monkeypatch), count_native(monkeypatch)
        fast = run()
        if path == "step":
            # the 18-row absorbed prefill (past MAX_ROWS: batch.c) and every decode step, one call each
            assert native["decode_step"] == 5 and not calls
        else:
            assert sum(y is not None for y in calls) == 4 * cfg.num_hidden_layers and not native["decode_step"]
        kernels_off(monkeypatch)
        torch.testing.assert_close(fast, run(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("spec", [0, 2])
def test_engine_steps_take_the_mla_kernel(monkeypatch, parts, spec):
    """Decode steps, and with MTP drafting the short verification and drafting chunks, run natively (a drafted
    greedy decode step as one `mtp_step` call); the tokens and the accepted drafts are those of the PyTorch path."""
    from dsv3.engine import EngineConfig, LLMEngine
    from dsv3.engine.sampling import SamplingParams

    model, tok = parts
    prompts = [[5 + i, 9, 11 + 2 * i, 7][: 2 + i % 3] for i in range(5 if spec == 0 else 2)]  # steps of <= 8 tokens
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    native = count_native(monkeypatch)
    cfg = EngineConfig(num_speculative_tokens=spec)

    def run():  # tokens, and which drafts were accepted: the MTP module must see the same hidden states
        engine = LLMEngine(model, tok, cfg)
        out = [o.outputs[0].token_ids for o in engine.generate(prompts, params)]
        return out, (engine.drafter.stats.accepted, engine.drafter.stats.drafted) if spec else None

    fast = run()
    assert native["decode_step"] + native["mtp_step"] >= 10  # the main model's steps
    if spec:
        assert native["mtp_step"] >= 5  # steady decoding: verify, accept and draft in one call
        assert native["decode_layers"] >= 2  # the MTP module's block catching up after each prompt
    per_module(monkeypatch)
    calls = count_mla_calls(monkeypatch)
    assert fast == run()
    assert sum(y is not None for y in calls) >= 10 * model.config.num_hidden_layers
    kernels_off(monkeypatch)
    assert fast == run()


def _decode_logits(model, steps=6):
    c = model.config
    cache = DenseLatentCache(c.num_hidden_layers, 1, 40, c.latent_dim, torch.float32)
    with torch.inference_mode():
        logits = [model(torch.arange(3, 19)[None], ctx=cache)[:, -1]]
        for _ in range(steps):
            logits.append(model(logits[-1].argmax(-1, keepdim=True), ctx=cache)[:, -1])
    return torch.cat(logits)


@pytest.mark.parametrize("path", ["step", "modules"])
@pytest.mark.parametrize("method", ["none", "int8", "int4"])
def test_model_decode_same_with_and_without_kernels(monkeypatch, method, path):
    """Every projection, expert and the (untied, quantized) LM head native, against PyTorch's kernels in fp32."""
    cfg = ModelConfig.from_dict({**TINY, "vocab_size": 97, "n_routed_experts": 16, "n_group": 4, "topk_group": 2,
                                 "num_experts_per_tok": 4, "q_lora_rank": 32})  # int4 native groups are multiples of 32
    torch.manual_seed(1)
    model = DeepseekV3ForCausalLM(cfg)
    model.init_weights(std=0.2)
    if method != "none":
        quantize_model(model, method, group_size=32, include_lm_head=True, progress=False)
    monkeypatch.setattr(quant_kernels, "KERNEL_ACT_DTYPE", None)  # PyTorch's int8 kernel in fp32, as the native one
    if path == "modules":
        per_module(monkeypatch)
    native, mla_calls = count_native(monkeypatch), count_mla_calls(monkeypatch)
    fast = _decode_logits(model)
    if path == "step":
        assert native["decode_step"] == 6 and not mla_calls  # every decode step, head included, in one call
    else:
        assert sum(y is not None for y in mla_calls) == 6 * cfg.num_hidden_layers  # every decode step, every layer
    kernels_off(monkeypatch)
    slow = _decode_logits(model)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def test_portable_build_without_avx512_matches(tmp_path):
    """The kernels' non-AVX-512 code (other x86 CPUs, ARM) built here with -mno-avx512f, on the same decode check."""
    code = (
        "import sys, torch; sys.path.insert(0, 'tests'); import pytest, test_kernels as t\n"
        "class MP:\n"
        "    def __init__(self): self.undo = []\n"
        "    def setattr(self, obj, name, value): self.undo.append((obj, name, getattr(obj, name))); setattr(obj, name, value)\n"
        "for method in ('none', 'int8', 'int4'):\n"
        "    mp = MP(); t.test_model_decode_same_with_and_without_kernels(mp, method, 'step')\n"
        "    for obj, name, value in reversed(mp.undo): setattr(obj, name, value)\n"
        "print('ok')\n")
    env = {**os.environ, "DSV3_KERNELS_CFLAGS": "-mno-avx512f", "DSV3_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]
    assert len(list((tmp_path / "kernels").glob("dsv3ops-*.so"))) == 1  # built here, not the cached AVX-512 one


def test_switched_off_by_environment():
    code = "from dsv3 import kernels; print(kernels.load() is False)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "DSV3_KERNELS": "0"}, capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr


def test_rms_norm_matches_torch():
    x, w = torch.randn(3, 1, 200) * 3, torch.rand(200) + 0.5
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), torch.nn.functional.rms_norm(x, (200,), w, 1e-6), atol=1e-6, rtol=1e-5)


def _tiny_model(seed: int = 3) -> DeepseekV3ForCausalLM:
    cfg = ModelConfig.from_dict({**TINY, "vocab_size": 97, "q_lora_rank": 32})
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg)
    model.init_weights(std=0.2)
    return model


def test_whole_step_plan_follows_the_model(monkeypatch):
    """The cached step plan is rebuilt when layers are quantized in place or weights move, and steps
    aside for forward hooks and expert-load recording, so what runs is always the model as it is now."""
    model = _tiny_model()
    monkeypatch.setattr(quant_kernels, "KERNEL_ACT_DTYPE", None)  # PyTorch's int8 kernel in fp32, as the native one
    native = count_native(monkeypatch)
    before = _decode_logits(model)
    quantize_model(model, "int8", include_lm_head=True, progress=False)  # replaces modules: plan rebuilt
    after = _decode_logits(model)
    assert native["decode_step"] == 12
    with monkeypatch.context() as m:
        kernels_off(m)
        torch.testing.assert_close(after, _decode_logits(model), atol=1e-4, rtol=1e-4)
    assert not torch.equal(before, after)

    model = _tiny_model()
    _decode_logits(model)
    with torch.no_grad():  # new storage for one weight, as `.to()` gives: the plan must not read the old one
        model.model.layers[1].mlp.shared_experts.down_proj.weight.data = torch.zeros_like(model.model.layers[1].mlp.shared_experts.down_proj.weight)
    moved = _decode_logits(model)
    with monkeypatch.context() as m:
        kernels_off(m)
        torch.testing.assert_close(moved, _decode_logits(model), atol=1e-4, rtol=1e-4)

    seen = []
    handle = model.model.layers[0].self_attn.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    native.clear()
    _decode_logits(model)
    assert len(seen) == 7 and native["decode_step"] == 0  # prefill + 6 decode steps, all through the module
    handle.remove()
    moe = model.model.layers[1].mlp
    moe.track_load = True
    _decode_logits(model)
    assert moe.expert_load.sum() == 22 * model.config.num_experts_per_tok and native["decode_step"] == 0
    moe.track_load = False
    _decode_logits(model)
    assert native["decode_step"] == 6


def test_whole_step_rejects_token_ids_outside_the_vocabulary():
    model = _tiny_model()
    cache = DenseLatentCache(model.config.num_hidden_layers, 1, 8, model.config.latent_dim, torch.float32)
    with torch.inference_mode(), pytest.raises(IndexError, match="out of range"):
        model(torch.tensor([[97]]), ctx=cache)


def _index_inputs(B, T, H, D, S, seed, integer=True):
    """Indexer inputs; small integers make every score exact in any summation order, with many ties."""
    g = torch.Generator().manual_seed(seed)
    if integer:
        q, w = torch.randint(-3, 4, (B, T, H, D), generator=g).float(), torch.randint(-2, 3, (B, T, H), generator=g).float()
        keys = torch.randint(-3, 4, (B, S, D), generator=g).float()
    else:
        q, w, keys = torch.randn(B, T, H, D, generator=g), torch.randn(B, T, H, generator=g), torch.randn(B, S, D, generator=g)
    n_visible = torch.randint(0, S + 1, (B, T), generator=g)
    n_visible[-1, -1] = 0  # one query sees nothing, one everything
    n_visible[0, 0] = S
    return q, w, keys, n_visible


def _check_index_topk(q, w, keys, n_visible, k):
    from dsv3.ops import reference

    idx, ok = torch.ops.dsv3.index_topk(q, w, keys, n_visible, k)
    ridx, rok = reference.index_topk(q, w, keys, n_visible, k)
    assert idx.shape == ridx.shape == (*q.shape[:2], min(k, keys.shape[1])) and idx.dtype == torch.int64
    assert ok.dtype == torch.bool and torch.equal(ok, rok)  # the chosen entries first, as many as the reference's
    assert torch.equal(torch.where(ok, idx, -1).sort(-1).values, torch.where(rok, ridx, -1).sort(-1).values)
    assert ((idx >= 0) & (idx < keys.shape[1])).all()  # every slot indexes an entry, chosen or not
    from dsv3.attention.backend import TorchBackend

    be = TorchBackend()  # the model's own PyTorch path (chunked), which runs where the native op does not
    bidx, bok = be.topk_select(be.index_scores(q, w, keys), torch.arange(keys.shape[1]) < n_visible[..., None], k)
    assert torch.equal(torch.where(ok, idx, -1).sort(-1).values, torch.where(bok, bidx, -1).sort(-1).values)
    scores = be.index_scores(q, w, keys).gather(-1, idx)
    rank = torch.where(ok, scores, float("-inf"))  # best first; equal scores in entry order
    assert (rank[..., :-1] >= rank[..., 1:]).all()
    same = (rank[..., :-1] == rank[..., 1:]) & ok[..., 1:]
    assert (idx[..., :-1][same] < idx[..., 1:][same]).all()
    return idx, ok


@pytest.mark.parametrize("B,T,H,D,S,k", [(1, 1, 4, 32, 1000, 64), (2, 37, 5, 16, 300, 64), (1, 3, 4, 8, 10, 64),
                                         (3, 5, 8, 24, 700, 7), (1, 260, 4, 32, 600, 64)])
@pytest.mark.parametrize("threads", [1, 3])
def test_index_topk_is_the_reference_selection_with_ties_to_the_earliest(B, T, H, D, S, k, threads):
    """`dsv3::index_topk` (csrc/index.c) against `topk_select(index_scores(...))`: on integer inputs every score is
    exact, so the chosen sets must be equal, ties at the k-th score included; decode (T = 1), odd heads (padded to
    blocks of 4), fewer entries than k, a query that sees none, entries split between threads (B < threads)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, w, keys, n_visible = _index_inputs(B, T, H, D, S, seed=S + T)
        _, ok = _check_index_topk(q, w, keys, n_visible, k)
    finally:
        torch.set_num_threads(old)
    assert ok[0, 0].sum() == min(k, S) and (B * T == 1 or not ok[-1, -1].any())


def test_index_topk_on_float_and_bf16_inputs():
    """Random fp32 scores (no ties to hide behind) over 5,000 entries, and bf16 inputs scored in fp32."""
    q, w, keys, n_visible = _index_inputs(2, 9, 4, 32, 5000, seed=3, integer=False)
    _check_index_topk(q, w, keys, n_visible, 64)
    _check_index_topk(q.bfloat16(), w.bfloat16(), keys.bfloat16(), n_visible, 64)
    _check_index_topk(q[:, :, :, ::2], w, keys[:, :, ::2], n_visible.int(), 64)  # strided q and keys, int32 n_visible


@pytest.mark.parametrize("bad,match", [
    (lambda q, w, k, n: (q[0], w, k, n, 4), "q \\[B, T, H, D\\]"),
    (lambda q, w, k, n: (q, w, k[:, :, :3], n, 4), "disagree"),
    (lambda q, w, k, n: (q, w, k, n + 100, 4), "n_visible must lie in"),
    (lambda q, w, k, n: (q, w, k, n.float(), 4), "n_visible must be int64 or int32"),
    (lambda q, w, k, n: (q, w, k, n, 0), "k must be >= 1"),
    (lambda q, w, k, n: (q.long(), w, k, n, 4), "floating point"),
])
def test_index_topk_refuses_bad_arguments_by_name(bad, match):
    q, w, keys, n_visible = _index_inputs(1, 4, 4, 8, 20, seed=0)
    with pytest.raises(RuntimeError, match="dsv3::index_topk: .*" + match):
        torch.ops.dsv3.index_topk(*bad(q, w, keys, n_visible))


@pytest.mark.parametrize("n,lead", [(1, (3,)), (2, (1, 1)), (4, (2, 7)), (4, (0, 5))])
def test_hc_sinkhorn_is_the_reference_split(n, lead):
    """`dsv3::hc_sinkhorn` (csrc/hyper.c) against the official kernel's order of operations in PyTorch
    (`reference.hc_sinkhorn`): pre, post and a comb whose columns sum to 1 after the last round; bf16 scale and base
    are read as fp32, as the reference reads them."""
    from dsv3.ops import reference

    g = torch.Generator().manual_seed(n)
    mixes = torch.randn(*lead, (2 + n) * n, generator=g) * 3
    scale, base = torch.rand(3, generator=g) + 0.5, torch.randn((2 + n) * n, generator=g)
    for s, b in ((scale, base), (scale.bfloat16(), base.bfloat16())):
        got, want = torch.ops.dsv3.hc_sinkhorn(mixes, s, b, n, 20, 1e-6), reference.hc_sinkhorn(mixes, s, b, n, 20, 1e-6)
        assert [t.shape for t in got] == [(*lead, n), (*lead, n), (*lead, n, n)]
        for a, r in zip(got, want):
            torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-5)
        if mixes.numel():
            torch.testing.assert_close(got[2].sum(-2), torch.ones(*lead, n), atol=1e-4, rtol=0)
    one = torch.ops.dsv3.hc_sinkhorn(mixes, scale, base, n, 1, 1e-6)[2]  # one round: the column normalisation only
    torch.testing.assert_close(one, reference.hc_sinkhorn(mixes, scale, base, n, 1, 1e-6)[2], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("args,match", [
    (lambda m, s, b: (m[..., :-1], s, b, 2, 20, 1e-6), "mixes must be"),
    (lambda m, s, b: (m, s[:2], b, 2, 20, 1e-6), "scale must hold 3 values"),
    (lambda m, s, b: (m, s, b, 2, 0, 1e-6), "iters must be >= 1"),
    (lambda m, s, b: (m.double(), s, b, 2, 20, 1e-6), "must be float32"),
])
def test_hc_sinkhorn_refuses_bad_arguments_by_name(args, match):
    mixes, scale, base = torch.randn(3, 8), torch.ones(3), torch.zeros(8)
    with pytest.raises(RuntimeError, match="dsv3::hc_sinkhorn: .*" + match):
        torch.ops.dsv3.hc_sinkhorn(*args(mixes, scale, base))
