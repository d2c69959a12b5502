"""LoRA adapters against PEFT on transformers' DeepseekV3ForCausalLM (fp32): both directions, merge, absorbed decode."""

from __future__ import annotations

import pytest
import torch

from dsv3.io.load import load_model
from dsv3.lora import LoRASpec, inject_lora, load_adapter, save_adapter, set_merged
from dsv3.lora.layers import LoRALinear
from dsv3.lora.merge import merge_adapter
from dsv3.attention import AttentionContext, DenseLatentCache
from hf_oracle import build_hf_model

peft = pytest.importorskip("peft")
TOL = 1e-4


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_base")
    build_hf_model("v3_yarn_groups").save_pretrained(path)
    return path


def _ids(seed: int = 0, T: int = 24):
    return torch.randint(3, 320, (2, T), generator=torch.Generator().manual_seed(seed))


def _randomise_b(model, std: float = 0.1, seed: int = 0):
    """Training leaves B non-zero; a zero B would make every comparison vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _peft_logits(base_dir, adapter_dir, ids, v4_names: bool, monkeypatch):
    """Load our adapter with PeftModel.from_pretrained on a fresh HF model built from the same checkpoint.

    PEFT (0.21) on transformers v5 rewrites every `gate_proj/up_proj/down_proj` target of a DeepSeek-V3 model
    into the fused *routed* experts, so dense MLPs and shared experts cannot be adapted through it. With
    `v4_names`, PEFT runs its transformers-v4 module matching, which adapts exactly the linears we name.
    """
    import transformers
    from peft import PeftModel

    if v4_names:
        monkeypatch.setattr("peft.tuners.tuners_utils.is_transformers_ge_v5", False)
        monkeypatch.setattr("peft.utils.save_and_load.is_transformers_ge_v5", False)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        base = hf(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(hf, adapter_dir).eval()(input_ids=ids).logits
    return base, adapted


def test_default_adapter_loads_in_peft_with_equal_logits(base_dir, tmp_path, monkeypatch):
    ours = load_model(base_dir, dtype=torch.float32, progress=False)
    spec = LoRASpec(r=8, lora_alpha=16, use_rslora=True)
    names = inject_lora(ours, spec)
    assert any(n.endswith("mlp.gate_proj") for n in names) and any("shared_experts" in n for n in names)
    assert not any(n.endswith(".experts") for n in names)  # routed experts are opt-in
    _randomise_b(ours)
    save_adapter(ours, tmp_path / "ad", spec)
    ids = _ids()
    with torch.no_grad():
        got = ours.eval()(ids)
    base, ref = _peft_logits(base_dir, tmp_path / "ad", ids, v4_names=True, monkeypatch=monkeypatch)
    assert (ref - base).abs().max() > 0.1  # the adapter really changes the model
    assert (ref - got).abs().max() <= TOL


def test_routed_expert_adapter_loads_in_peft_v5(base_dir, tmp_path):
    """Per-expert names (v4/vLLM layout) are converted by PEFT into its fused v5 experts with equal logits."""
    ours = load_model(base_dir, dtype=torch.float32, progress=False)
    spec = LoRASpec(r=4, lora_alpha=8, routed_experts=True,
                    target_modules=["q_a_proj", "kv_b_proj", "experts.gate_proj", "experts.up_proj", "experts.down_proj"])
    inject_lora(ours, spec)
    _randomise_b(ours, seed=1)
    save_adapter(ours, tmp_path / "ad", spec)
    ids = _ids(1)
    with torch.no_grad():
        got = ours.eval()(ids)
    base, ref = _peft_logits(base_dir, tmp_path / "ad", ids, v4_names=False, monkeypatch=None)
    assert (ref - base).abs().max() > 0.1
    assert (ref - got).abs().max() <= TOL


@pytest.mark.parametrize("targets", [["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
                                     ["q_a_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]])
def test_peft_made_adapter_loads_here_with_equal_logits(base_dir, tmp_path, targets):
    """PEFT's own adapters (the second set becomes fused routed-expert `target_parameters` on transformers v5)."""
    from peft import LoraConfig, get_peft_model
    import transformers

    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager").eval()
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=12, target_modules=targets, use_rslora=True))
    _randomise_b(pm, seed=2)
    pm.save_pretrained(tmp_path / "peft_ad")
    ids = _ids(2)
    with torch.no_grad():
        ref = pm.eval()(input_ids=ids).logits
        ours = load_model(base_dir, dtype=torch.float32, progress=False)
        base = ours(ids)
        spec = load_adapter(ours, tmp_path / "peft_ad")
        got = ours(ids)
    assert spec.r == 4 and spec.use_rslora
    assert (got - base).abs().max() > 0.1
    assert (ref - got).abs().max() <= TOL


def test_merge_equals_unmerged_and_merged_checkpoint(base_dir, tmp_path):
    ours = load_model(base_dir, dtype=torch.float32, progress=False)
    spec = LoRASpec(r=8, routed_experts=True)
    inject_lora(ours, spec)
    _randomise_b(ours, seed=3)
    save_adapter(ours, tmp_path / "ad", spec)
    ids = _ids(3)
    with torch.no_grad():
        unmerged = ours.eval()(ids)
        set_merged(ours, True)
        merged = ours(ids)
        set_merged(ours, False)
        again = ours(ids)
    assert (merged - unmerged).abs().max() <= TOL
    assert (again - unmerged).abs().max() <= TOL
    out = merge_adapter(base_dir, tmp_path / "ad", tmp_path / "merged", dtype="fp32", progress=False)
    plain = load_model(out, dtype=torch.float32, progress=False)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    with torch.no_grad():
        assert (plain(ids) - unmerged).abs().max() <= TOL


@torch.no_grad()
def test_absorbed_decode_with_adapter_equals_full_recompute(base_dir):
    """kv_b_proj's adapter reaches MLA's absorbed path through dense_weight() — not silently skipped."""
    ours = load_model(base_dir, dtype=torch.float32, progress=False)
    inject_lora(ours, LoRASpec(r=8, target_modules=["kv_b_proj", "q_b_proj"]))
    _randomise_b(ours, std=0.3, seed=4)
    ours.eval()
    ids, cfg, T = _ids(4, 20), ours.config, 20
    full = ours(ids, ctx=AttentionContext.causal())
    cache = DenseLatentCache(cfg.num_hidden_layers, 2, T, cfg.latent_dim, torch.float32, impl="absorb")
    steps = [ours(ids[:, :12], ctx=cache)] + [ours(ids[:, i:i + 1], ctx=cache) for i in range(12, T)]
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5
    for m in ours.modules():  # the same decode ignoring the kv_b adapter must differ
        if isinstance(m, LoRALinear) and m is ours.model.layers[0].self_attn.kv_b_proj:
            m.dense_weight = lambda m=m: m.base_layer.weight
    cache = DenseLatentCache(cfg.num_hidden_layers, 2, T, cfg.latent_dim, torch.float32, impl="absorb")
    skipped = torch.cat([ours(ids[:, :12], ctx=cache)] + [ours(ids[:, i:i + 1], ctx=cache) for i in range(12, T)], 1)
    assert (skipped[:, 12:] - full[:, 12:]).abs().max() > 1e-3


@torch.no_grad()
def test_per_sequence_adapter_slots_equal_single_adapter_runs():
    """Stacked slots gathered by a per-row id give each row what its adapter alone gives (-1 = base)."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(16, 12, bias=False), r=4, alpha=8.0, slots=2)
    layer.lora_A.normal_()
    layer.lora_B.normal_()
    x = torch.randn(3, 5, 16)
    layer.slot_ids = torch.tensor([1, -1, 0])
    mixed = layer(x)
    expect = []
    for row, slot in zip(x, [1, -1, 0]):
        y = layer.base_layer(row)
        if slot >= 0:
            y = y + row @ layer.lora_A[slot].T @ layer.lora_B[slot].T * layer.scaling[slot]
        expect.append(y)
    assert torch.allclose(mixed, torch.stack(expect), atol=1e-5)
    assert (mixed[0] - mixed[2]).abs().max() > 1e-3 or (mixed[0] - layer.base_layer(x[0])).abs().max() > 1e-3


@torch.no_grad()
def test_stacked_adapters_serve_a_mixed_batch(base_dir, tmp_path):
    """Two adapters (different ranks and targets) and the base model in one batch = each served alone."""
    from dsv3.lora import set_slot_ids
    from dsv3.lora.multi import load_stacked

    dirs = []
    for i, (r, targets) in enumerate([(4, ["q_a_proj", "kv_b_proj", "o_proj"]), (8, ["kv_b_proj", "gate_proj", "down_proj"])]):
        m = load_model(base_dir, dtype=torch.float32, progress=False)
        spec = LoRASpec(r=r, lora_alpha=2.0 * r + i, target_modules=targets)
        inject_lora(m, spec)
        _randomise_b(m, seed=10 + i)
        dirs.append(save_adapter(m, tmp_path / f"ad{i}", spec))
    ids = _ids(5)[:1].expand(3, -1)
    alone = []
    for d in dirs + [None]:
        m = load_model(base_dir, dtype=torch.float32, progress=False)
        if d is not None:
            load_adapter(m, d)
        alone.append(m(ids[:1])[0])
    served = load_model(base_dir, dtype=torch.float32, progress=False)
    load_stacked(served, dirs)
    set_slot_ids(served, torch.tensor([0, 1, -1]))
    mixed = served(ids)
    for row in range(3):
        assert (mixed[row] - alone[row]).abs().max() <= 1e-5, row
    assert (alone[0] - alone[1]).abs().max() > 0.1 and (alone[0] - alone[2]).abs().max() > 0.1


def test_peft_adapter_with_rank_and_alpha_patterns_round_trips(base_dir, tmp_path):
    """PEFT rank_pattern/alpha_pattern are honoured on load and re-emitted on save, so PEFT reads our copy back."""
    from peft import LoraConfig, PeftModel, get_peft_model
    import transformers

    def fresh_hf():
        return transformers.DeepseekV3ForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager").eval()

    lc = LoraConfig(r=4, lora_alpha=8, target_modules=["q_a_proj", "kv_b_proj", "o_proj"],
                    rank_pattern={"o_proj": 8}, alpha_pattern={"kv_b_proj": 3})
    pm = get_peft_model(fresh_hf(), lc)
    _randomise_b(pm, seed=6)
    pm.save_pretrained(tmp_path / "peft_ad")
    ids = _ids(6)
    with torch.no_grad():
        ref = pm.eval()(input_ids=ids).logits
        ours = load_model(base_dir, dtype=torch.float32, progress=False)
        spec = load_adapter(ours, tmp_path / "peft_ad")
        assert (ours(ids) - ref).abs().max() <= TOL
        save_adapter(ours, tmp_path / "resaved", spec)
        back = PeftModel.from_pretrained(fresh_hf(), tmp_path / "resaved").eval()(input_ids=ids).logits
    assert (back - ref).abs().max() <= TOL


def test_grouped_matmul_gradients_match_a_per_expert_reference():
    """The training path through routed experts (frozen weights, trainable LoRA) has exact gradients on CPU."""
    from dsv3.lora.layers import grouped

    g = torch.Generator().manual_seed(0)
    sizes = [3, 0, 5, 4]
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    x = torch.randn(12, 16, generator=g, requires_grad=True)
    frozen = torch.randn(4, 8, 16, generator=g)
    lora = torch.randn(4, 8, 16, generator=g, requires_grad=True)
    (grouped(x, frozen, offs) * 1.5 + grouped(x, lora, offs)).square().sum().backward()
    got_x, got_w = x.grad.clone(), lora.grad.clone()
    x.grad, lora.grad = None, None
    parts = [c @ frozen[e].T * 1.5 + c @ lora[e].T for e, c in enumerate(torch.split(x, sizes))]
    torch.cat(parts).square().sum().backward()
    assert torch.allclose(got_x, x.grad, atol=1e-4) and torch.allclose(got_w, lora.grad, atol=1e-4)
    assert got_x.abs().max() > 0.1


@pytest.mark.parametrize("layout", ["v3_yarn_groups", "v3_plain_tied", "v2_group_limited"])
@pytest.mark.parametrize("routed", [False, True])
def test_adapter_in_real_peft_equals_the_merged_checkpoint(tmp_path, layout, routed):
    """Every layer layout -- a dense prefix, all-MoE with shared experts (`first_k_dense_replace: 0`, V3 and V2) --
    with and without routed-expert adapters: PEFT on transformers v5 as installed (no v4 matching), loading the
    adapter dsv3 wrote, gives the logits of the checkpoint `dsv3 merge` writes from it. Dense-MLP and shared-expert
    linears are named in `target_parameters`, which PEFT's v5 MoE rewrite does not move onto the routed experts."""
    import json

    import transformers
    from peft import PeftModel

    base_dir = tmp_path / "base"
    hf = build_hf_model(layout)
    hf.save_pretrained(base_dir)
    ours = load_model(base_dir, dtype=torch.float32, progress=False)
    spec = LoRASpec(r=4, lora_alpha=8, routed_experts=routed)
    names = inject_lora(ours, spec)
    assert any("shared_experts" in n for n in names)
    _randomise_b(ours, seed=5)
    save_adapter(ours, tmp_path / "ad", spec)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert all(p.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")) for p in cfg["target_parameters"])
    merged = load_model(merge_adapter(base_dir, tmp_path / "ad", tmp_path / "merged", dtype="fp32", progress=False),
                        dtype=torch.float32, progress=False)
    ids = _ids(5)
    cls = type(hf)
    with torch.no_grad():
        want = merged(ids)
        fresh = cls.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager").eval()
        base = fresh(input_ids=ids).logits
        got = PeftModel.from_pretrained(fresh, tmp_path / "ad").eval()(input_ids=ids).logits
    assert (want - base).abs().max() > 0.1
    assert (got - want).abs().max() <= TOL
