"""QLoRA: LoRA adapters trained over an int8 / int4 base (gradients, learning, adapters on the fp base, CLI).

Oracles: the format's own dequantization (`fmt.dequant`, independent of the cached fast unpack the
backward uses) with plain autograd; a per-token loop for the routed experts; PEFT on transformers'
model for the saved adapter.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import dsv3.cli
import dsv3.quant.kernels as kn
from dsv3.io.load import load_model
from dsv3.io.checkpoint import save_model
from dsv3.lora import load_adapter
from dsv3.lora.layers import LoRALinear
from dsv3.lora.qlora import quantize_base
from dsv3.lora.train_config import FinetuneConfigError, load_config
from dsv3.lora.trainer import finetune
from dsv3.quant.experts import QuantExperts
from dsv3.quant.formats import make_format
from dsv3.quant.linear import QuantLinear, dequant
from tiny_model import make_tiny_model_dir

MLA = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
WORDS = ["apple", "house", "table", "river", "stone", "cloud", "green", "light", "sugar", "plant", "water", "music"]
FORMATS = [("int8", 128), ("int4", 32)]


@pytest.mark.parametrize("method, group", FORMATS)
def test_qlora_layer_gradients_match_the_dequantized_reference(method, group):
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=False)
    layer = LoRALinear(QuantLinear.from_linear(lin, make_format(method, group)), r=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
    assert layer.lora_A.dtype == torch.float32 and not any(b.requires_grad for b in layer.base_layer.buffers())
    x = torch.randn(2, 5, 64, generator=g, requires_grad=True)
    probe = torch.randn(2, 5, 48, generator=g)  # a linear loss: its gradients do not depend on forward rounding
    (layer(x) * probe).sum().backward()
    w = layer.base_layer.fmt.dequant(layer.base_layer.tensors, 48, 64)  # the format's own (slow) unpacking
    xr = x.detach().clone().requires_grad_()
    a, b = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    ref = F.linear(xr, w) + F.linear(F.linear(xr, a[0]), b[0]) * 2.0
    (ref * probe).sum().backward()
    for got, want in ((x.grad, xr.grad), (layer.lora_A.grad, a.grad), (layer.lora_B.grad, b.grad)):
        assert (got - want).abs().max() <= 1e-4
    assert (w - lin.weight).abs().max() > 0  # really quantized
    assert (dequant(layer.base_layer.fmt, layer.base_layer.tensors, 48, 64) - w).abs().max() <= 1e-6  # the fast unpack


@pytest.mark.parametrize("method, group", FORMATS)
def test_gradients_pass_through_quantized_routed_experts(method, group, monkeypatch):
    """The recomputing backward of packed experts: d/dx and d/d(routing weights) against a per-token loop."""
    monkeypatch.setattr(kn, "KERNEL_ACT_DTYPE", None)  # fp32 activations in the kernels: forward comparable too
    g = torch.Generator().manual_seed(1)
    E, D, Im, N, K = 6, 64, 32, 9, 2
    fmt = make_format(method, group)
    w = {"gate_proj": torch.randn(E, Im, D, generator=g) * 0.2, "up_proj": torch.randn(E, Im, D, generator=g) * 0.2,
         "down_proj": torch.randn(E, D, Im, generator=g) * 0.2}
    qe = QuantExperts(fmt, E, D, Im, {p: fmt.quantize(t) for p, t in w.items()})
    deq = {p: fmt.dequant(qe.proj(p), *qe.shapes[p]) for p in w}
    x = torch.randn(N, D, generator=g, requires_grad=True)
    weights = torch.rand(N, K, generator=g, requires_grad=True)
    idx = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(N)])  # expert E-1 never routed to
    probe = torch.randn(N, D, generator=g)
    y = qe(x, idx, weights)  # packed experts carry their own backward
    (y * probe).sum().backward()
    xr, wr = x.detach().clone().requires_grad_(), weights.detach().clone().requires_grad_()
    rows = []
    for n in range(N):
        out = 0
        for k in range(K):
            e = int(idx[n, k])
            h = F.silu(deq["gate_proj"][e] @ xr[n]) * (deq["up_proj"][e] @ xr[n])
            out = out + wr[n, k] * (deq["down_proj"][e] @ h)
        rows.append(out)
    ref = torch.stack(rows)
    (ref * probe).sum().backward()
    assert (y - ref).abs().max() <= 1e-4
    assert (x.grad - xr.grad).abs().max() <= 1e-4 and (weights.grad - wr.grad).abs().max() <= 1e-4
    assert x.grad.abs().max() > 1e-2 and weights.grad.abs().max() > 1e-2


# ---- a whole QLoRA run --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny model HF can load too, re-initialised at std 0.06 so int8 changes its logits by ~1 %, not ~10 %.

    Every token is routed to all 8 experts, so the logits are a smooth function of the weights: a top-k
    expert choice flipping under a tiny perturbation would make any quantization-error bound meaningless.
    """
    root = tmp_path_factory.mktemp("qlora")
    src = make_tiny_model_dir(root / "src", num_key_value_heads=4, n_group=1, topk_group=1, num_experts_per_tok=8)
    model = load_model(src, dtype="fp32", progress=False)
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights(std=0.06)
    d = save_model(model, root / "base", tokenizer_from=src)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Spell {w} backwards", "output": " ".join(w[::-1])}) + "\n" for w in WORDS))
    return d, data, root


@pytest.fixture(scope="module", params=[pytest.param(FORMATS[0], marks=pytest.mark.slow, id="int8"),  # gradients: both, fast
                                        pytest.param(FORMATS[1], id="int4")])
def run(request, base):
    d, data, root = base
    method, group = request.param
    cfg = load_config(None, dict(model=str(d), data_files=[str(data)], output_dir=str(root / method), learning_rate=1e-2,
                                 batch_size=4, micro_batch_size=4, lora_rank=8, train_steps=5, max_seq_len=128, plot=False,
                                 quantization=method, group_size=group, target_modules=MLA))
    return method, group, finetune(cfg, progress=False, log=lambda *a: None), root / method


def test_qlora_steps_lower_the_loss(run):
    method, _, summary, out = run
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.5, losses
    assert (out / "adapter_model.safetensors").is_file()


def _quantized_with_adapter(d, method, group, adapter):
    q = load_model(d, dtype="fp32", progress=False)
    quantize_base(q, method, group)
    load_adapter(q, adapter)
    return q


@torch.no_grad()
def test_adapter_is_a_delta_on_the_weights_it_was_trained_against(base, run, monkeypatch):
    """On a fp checkpoint holding exactly the dequantized weights, the saved adapter reproduces the QLoRA model."""
    monkeypatch.setattr(kn, "KERNEL_ACT_DTYPE", None)
    d, _, _ = base
    method, group, _, adapter = run
    q = _quantized_with_adapter(d, method, group, adapter)
    fp = load_model(d, dtype="fp32", progress=False)
    for name, m in q.named_modules():
        if isinstance(m, QuantLinear):
            fp.get_submodule(name.removesuffix(".base_layer")).weight.copy_(dequant(m.fmt, m.tensors, m.out_features, m.in_features))
        elif isinstance(m, QuantExperts):
            experts = fp.get_submodule(name.removesuffix(".base_layer"))
            deq = {p: dequant(m.fmt, m.proj(p), *m.shapes[p]) for p in ("gate_proj", "up_proj", "down_proj")}
            experts.gate_up_proj.copy_(torch.cat([deq["gate_proj"], deq["up_proj"]], dim=1))
            experts.down_proj.copy_(deq["down_proj"])
    load_adapter(fp, adapter)
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    assert (fp(ids) - q(ids)).abs().max() <= 1e-4


@torch.no_grad()
def test_qlora_adapter_on_the_full_precision_base_dsv3_and_peft(base, run):
    """The bound: the adapted fp and QLoRA models differ only by the base's quantization error (same A, B), and
    the model is smooth in its weights, so their gap is held to 3x the gap between the two bases without the
    adapter (measured 0.7-1.6x over steps and learning rates, int8 and int4). It is not vacuous: the adapter
    moves the fp logits by 60-100x that gap (int8), and it accounts for most of the QLoRA model's distance
    from the fp base (the remaining gap is < 0.3 of it)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    d, _, _ = base
    method, group, _, adapter = run
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    fp = load_model(d, dtype="fp32", progress=False)
    fp_base = fp(ids)
    load_adapter(fp, adapter)
    fp_adapted = fp(ids)
    q = load_model(d, dtype="fp32", progress=False)
    quantize_base(q, method, group)
    q_base = q(ids)
    load_adapter(q, adapter)
    q_adapted = q(ids)
    base_gap = (fp_base - q_base).abs().max()
    assert (fp_adapted - q_adapted).abs().max() <= 3 * base_gap
    assert (fp_adapted - q_adapted).abs().max() < 0.5 * (fp_base - q_adapted).abs().max()  # the adapter explains the rest
    if method == "int8":
        assert (fp_adapted - fp_base).abs().max() > 20 * base_gap
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    assert (hf(input_ids=ids).logits - fp_base).abs().max() <= 1e-4
    got = peft.PeftModel.from_pretrained(hf, adapter).eval()(input_ids=ids).logits
    assert (got - fp_adapted).abs().max() <= 1e-4


def test_cli_finetune_int4_end_to_end(base, tmp_path, monkeypatch, capsys):
    d, data, _ = base
    monkeypatch.setattr("sys.argv", ["dsv3"])
    argv = ["finetune", "--model", d, "--data-files", data, "--output-dir", tmp_path / "out", "--quantization", "int4",
            "--group-size", "32", "--lora-rank", "4", "--batch-size", "2", "--micro-batch-size", "2", "--train-steps", "2",
            "--learning-rate", "0.01", "--no-plot", "-q"]
    assert dsv3.cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 2
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    fp = load_model(d, dtype="fp32", progress=False)
    load_adapter(fp, tmp_path / "out")  # loads on the full-precision base
    assert all(isinstance(m.base_layer, torch.nn.Linear) for m in fp.modules() if isinstance(m, LoRALinear))
    for overrides, culprit in (({"quantization": "nf4"}, "none, int8 or int4"), ({"quantization": "int4", "group_size": 48}, "group_size"),
                               ({"quantization": "int8", "routed_experts": True}, "full-precision experts")):
        with pytest.raises(FinetuneConfigError, match=culprit):
            load_config(None, overrides)
    rc = dsv3.cli.main(["finetune", "--quantization", "nf4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "nf4" in err[0]
