"""The GPU path, as far as a machine without a GPU can check it (the kernels themselves: test_triton_kernels.py).

* `--device cuda|cpu|auto` on every model-running command: CUDA asked for without one is one line and exit 2
  before anything loads or is written; auto picks CUDA when present, and bf16 there; the device reaches the loader.
* The CUDA attention backend's absorbed decode (q·W_UK, the `dsv3::mla_attend` op, ·W_UV) equals TorchBackend's
  on a real MLA layer, dense, masked and DSA-style over chosen slots; the op's reference equals TorchBackend too.
* The CUDA implementations register for the dispatch key, and the maintained packages behind them (FlashMLA,
  DeepGEMM, sgl-kernel) are reached with the layouts their APIs take and dropped when they disagree.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from dsv3 import cli
from dsv3.errors import DSV3Error


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_model import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


COMMANDS = {
    "generate": ["generate", "--model", "{m}", "hello"],
    "chat": ["chat", "--model", "{m}"],
    "serve": ["serve", "--model", "{m}", "--port", "0"],
    "eval": ["eval", "perplexity", "--model", "{m}", "--data", "{m}/config.json"],
    "quantize": ["quantize", "--method", "int8", "--model", "{m}", "-o", "{out}"],
    "finetune": ["finetune", "--model", "{m}", "--data-files", "{m}/config.json", "--output-dir", "{out}"],
    "pretrain": ["pretrain", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "pretrain-tiny.yaml"),
                 "--out", "{out}"],
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_device_cuda_without_cuda_is_one_line(name, tiny, tmp_path, capsys, no_cuda):
    out = tmp_path / "out"
    argv = [a.format(m=tiny, out=out) for a in COMMANDS[name]] + ["--device", "cuda"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dsv3: error: --device cuda: no CUDA device is available on this machine (use --device cpu, or auto)"]
    assert not out.exists()  # refused before anything was written


def test_device_flag_rejects_other_values(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--device", "tpu", "hi"])
    assert e.value.code == 2 and "invalid choice: 'tpu'" in capsys.readouterr().err


def test_auto_is_cuda_when_present_and_bf16_there(fake_cuda):
    from dsv3.commands.run import device_dtype, resolve_device

    assert resolve_device("auto") == "cuda" and resolve_device("cuda:1") == "cuda:1" and resolve_device("cpu") == "cpu"
    assert device_dtype("auto", "cuda") == "bf16" and device_dtype("fp32", "cuda") == "fp32"
    assert device_dtype("auto", "cpu") == "auto"
    with pytest.raises(DSV3Error, match="use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")


def test_auto_is_cpu_without_cuda(no_cuda):
    from dsv3.commands.run import resolve_device

    assert resolve_device("auto") == "cpu" and resolve_device(None) == "cpu"


class _Loaded(Exception):
    pass


def test_the_device_reaches_the_loaders(tiny, tmp_path, monkeypatch, fake_cuda, capsys):
    """With CUDA (faked), generate/eval/quantize/serve load on "cuda" in bf16; the load itself is intercepted."""
    seen = []

    def record(*args, **kw):
        seen.append((kw.get("device"), kw.get("dtype")))
        raise DSV3Error("intercepted")

    import dsv3.commands.quantize
    import dsv3.io.load
    import dsv3.llm

    monkeypatch.setattr(dsv3.llm.LLM, "__init__", lambda self, *a, **kw: record(*a, **kw))
    monkeypatch.setattr(dsv3.io.load, "load_model", record)
    monkeypatch.setattr(dsv3.io.load, "load_for_inference", record)
    for argv in (["generate", "--model", str(tiny), "hi"],
                 ["eval", "perplexity", "--model", str(tiny), "--data", str(tiny / "config.json")],
                 ["quantize", "--method", "int8", "--model", str(tiny), "-o", str(tmp_path / "q")]):
        assert cli.main(argv) == 2
    from dsv3.commands.serve import loader

    args = cli.build_parser().parse_args(["serve", "--model", str(tiny)])
    with pytest.raises(DSV3Error, match="intercepted"):
        loader(args, path=tiny)()
    assert seen == [("cuda", "bf16")] * 4
    cli.main(["generate", "--model", str(tiny), "--device", "cpu", "--dtype", "fp32", "hi"])
    assert seen[-1] == ("cpu", "fp32")


# ---- the CUDA attention backend's math, on CPU through the op's reference --------------------------------------
def _mla_layer():
    from tiny_model import TINY

    from dsv3.config import ModelConfig
    from dsv3.layers.mla import MLA

    torch.manual_seed(0)
    layer = MLA(ModelConfig.from_dict({**TINY, "vocab_size": 64}), 0)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return layer


def test_reference_mla_attend_equals_torch_backend_absorbed():
    from dsv3.attention.backend import TorchBackend
    from dsv3.ops import reference

    layer = _mla_layer()
    B, S, H, C = 3, 7, layer.n_heads, layer.kv_lora_rank
    kv = torch.randn(B, S, C + layer.rope_dim)
    q_nope, q_pe = torch.randn(B, 1, H, layer.nope_dim), torch.randn(B, 1, H, layer.rope_dim)
    mask = torch.arange(S)[None, :] < torch.tensor([7, 3, 5])[:, None]
    want = TorchBackend().absorbed(layer, q_nope, q_pe, kv, mask[:, None, None, :])
    w = layer.kv_b_weight()
    q = torch.cat([torch.einsum("bhd,hdc->bhc", q_nope[:, 0], w[:, : layer.nope_dim]), q_pe[:, 0]], -1)
    slots = torch.arange(B * S).view(B, S)
    o_lat = reference.mla_attend(q, kv.reshape(B * S, -1), slots, mask.sum(1), C, layer.scale)
    got = torch.einsum("bhc,hdc->bhd", o_lat, w[:, layer.nope_dim:])
    assert torch.allclose(got, want[:, 0], atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_triton_backend_absorbed_equals_torch_backend(masked, monkeypatch):
    """TritonBackend's decode glue on a real layer (the op runs its reference on CPU): same output as TorchBackend."""
    from dsv3.attention import backend as be

    monkeypatch.setattr(be, "_gpu_ops", lambda: True)
    layer = _mla_layer()
    B, S, H = 4, 9, layer.n_heads
    kv = torch.randn(B, S, layer.kv_lora_rank + layer.rope_dim)
    q_nope, q_pe = torch.randn(B, 1, H, layer.nope_dim), torch.randn(B, 1, H, layer.rope_dim)
    mask = (torch.arange(S)[None, :] < torch.tensor([9, 1, 4, 6])[:, None])[:, None, None, :] if masked else None
    want = be.TorchBackend().absorbed(layer, q_nope, q_pe, kv, mask)
    triton_backend = be.TritonBackend()
    slots = be.gathered_slots(kv, mask)  # what absorbed() hands the kernel on CUDA
    assert torch.equal(slots >= 0, torch.ones(B, S, dtype=torch.bool) if mask is None else mask.reshape(B, S))
    got = triton_backend.decode_slots(layer, q_nope, q_pe, kv.reshape(B * S, -1), slots, None)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    # CPU tensors take TorchBackend's own path through absorbed()
    assert torch.equal(triton_backend.absorbed(layer, q_nope, q_pe, kv, mask), want)


def test_triton_backend_reads_dsa_slots_straight_from_the_cache(monkeypatch):
    """Sparse decode: the chosen slots of a cache layer, read in place, equal attention over their gathered copy."""
    from dsv3.attention import backend as be

    layer = _mla_layer()
    cache = torch.randn(50, layer.kv_lora_rank + layer.rope_dim)
    idx = torch.stack([torch.randperm(50)[:6] for _ in range(2)]).int()
    idx[1, 4:] = -1
    q_nope, q_pe = torch.randn(2, 1, layer.n_heads, layer.nope_dim), torch.randn(2, 1, layer.n_heads, layer.rope_dim)
    got = be.TritonBackend().decode_slots(layer, q_nope, q_pe, cache, idx, None)
    mask = (idx >= 0)[:, None, None, :]
    want = be.TorchBackend().absorbed(layer, q_nope, q_pe, cache[idx.long().clamp(min=0)], mask)
    assert torch.allclose(got, want, atol=1e-5)


def test_backend_for_picks_triton_on_cuda():
    from dsv3.attention.backend import TorchBackend, TritonBackend, backend_for

    assert type(backend_for("cpu")) is TorchBackend
    assert isinstance(backend_for("cuda"), TritonBackend) and backend_for(torch.device("cuda", 1)).name == "triton"


# ---- registration and the maintained packages -----------------------------------------------------------------
def test_cuda_kernels_register_for_the_dispatch_key():
    pytest.importorskip("triton")
    from dsv3.ops import triton as gpu

    assert gpu.register() and gpu.register()  # idempotent
    for op in ("mla_attend", "fused_moe", "fp8_gemm", "route_noaux"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dsv3::{op}", "CUDA"), op
    # CPU tensors still reach the references
    q, cache = torch.randn(2, 3, 12), torch.randn(5, 12)
    out = torch.ops.dsv3.mla_attend(q, cache, torch.tensor([[0, 1], [2, -1]]), None, 8, 0.5)
    assert out.shape == (2, 3, 8)


def _fake_flash_mla(calls):
    """FlashMLA's documented API, computed with dsv3's reference: q [b, s_q, h, 576], cache [blocks, 64, 1, 576]."""
    from dsv3.ops import reference

    def get_mla_metadata(seqlens, heads_per_k, heads_k):
        calls.append(("meta", seqlens.dtype, heads_per_k, heads_k))
        return torch.zeros(1, 8, dtype=torch.int32), torch.zeros(seqlens.numel() + 1, dtype=torch.int32)

    def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits, softmax_scale=None,
                               causal=False):
        calls.append(("run", tuple(k_cache.shape), block_table.dtype, head_dim_v, causal))
        bs = k_cache.shape[1]
        flat = k_cache.reshape(-1, k_cache.shape[-1])
        width = block_table.shape[1] * bs
        pos = torch.arange(width)
        slots = block_table.long()[:, pos // bs] * bs + pos % bs
        out = reference.mla_attend(q[:, 0], flat, slots, cache_seqlens, head_dim_v, softmax_scale)
        return out[:, None], torch.zeros(q.shape[0], q.shape[2], 1)

    return types.SimpleNamespace(get_mla_metadata=get_mla_metadata, flash_mla_with_kvcache=flash_mla_with_kvcache)


def test_flash_mla_adapter_passes_its_layout(monkeypatch):
    from dsv3.ops import reference
    from dsv3.ops.triton import vendor

    calls = []
    monkeypatch.setitem(sys.modules, "flash_mla", _fake_flash_mla(calls))
    monkeypatch.setattr(vendor, "_state", {})
    C, W = 32, 40
    cache = torch.randn(4 * 64, W)
    table = torch.tensor([[2, 0], [3, 1]], dtype=torch.int32)
    lens = torch.tensor([70, 5], dtype=torch.int32)
    q = torch.randn(2, 4, W)
    got = vendor.flash_mla(q, cache, table, lens, C, 0.3)
    slots = torch.cat([table.long()[:, :1] * 64 + torch.arange(64), table.long()[:, 1:] * 64 + torch.arange(64)], 1)
    assert torch.allclose(got, reference.mla_attend(q, cache, slots, lens, C, 0.3), atol=1e-6)
    assert calls == [("meta", torch.int32, 4, 1), ("run", (4, 64, 1, W), torch.int32, C, False)]


def test_a_vendor_kernel_that_disagrees_is_switched_off(monkeypatch, caplog):
    from dsv3.ops.triton import vendor

    monkeypatch.setattr(vendor, "_state", {})
    good = torch.ones(3)
    assert vendor.checked("pkg", lambda: good * 1.001, lambda: good) is not None  # agrees: used, then trusted
    assert vendor._state["pkg"] == "ok"
    assert vendor.checked("other", lambda: good * 2, lambda: good) is None
    assert vendor._state["other"] == "off" and "other is installed but not used" in caplog.text
    assert vendor.checked("other", lambda: good, lambda: good) is None  # stays off
    assert vendor.checked("broken", lambda: 1 / 0, lambda: good) is None and vendor._state["broken"] == "off"


def test_vendor_packages_can_be_switched_off(monkeypatch):
    from dsv3.ops.triton import vendor

    monkeypatch.setitem(sys.modules, "flash_mla", types.SimpleNamespace())
    monkeypatch.setattr(vendor, "_state", {})
    assert vendor.module("flash_mla") is not None
    monkeypatch.setenv("DSV3_GPU_KERNELS", "triton")
    assert vendor.module("flash_mla") is None
    assert vendor.module("surely_not_a_module_dsv3") is None


def test_gpu_ops_are_declared_with_shapes_on_meta_tensors():
    from dsv3.ops import schemas

    for name, schema in schemas.GPU_SCHEMAS.items():
        assert str(getattr(torch.ops.dsv3, name).default._schema) == f"dsv3::{schema}"
    m = torch.device("meta")
    assert torch.ops.dsv3.mla_attend(torch.empty(3, 4, 80, device=m), torch.empty(9, 80, device=m),
                                     torch.empty(3, 5, dtype=torch.int32, device=m), None, 64, 0.1).shape == (3, 4, 64)
    x = torch.empty(5, 16, dtype=torch.bfloat16, device=m)
    assert torch.ops.dsv3.fused_moe(x, torch.empty(4, 8, 16, device=m), torch.empty(4, 16, 4, device=m),
                                    torch.empty(5, 2, dtype=torch.long, device=m), torch.empty(5, 2, device=m)).shape == x.shape
    y = torch.ops.dsv3.fp8_gemm(x, torch.empty(300, 16, dtype=torch.float8_e4m3fn, device=m), torch.empty(3, 1, device=m))
    assert y.shape == (5, 300) and y.dtype == torch.bfloat16
