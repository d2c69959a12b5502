"""DeepSeek-V3/R1's released FP8 files split some weight/scale pairs across shards (deepseek-ai/DeepSeek-V3 PR #2):
`weight_scale_inv` is found through the index's weight map, by the plain loader (dequantizing), the packed loader
(`--quantization fp8`, kept FP8) and the sharded loader (every rank reads its blocks).

The checkpoint is laid out as released: FP8 e4m3 weights with fp32 128×128 `weight_scale_inv`, several
`model-0000k-of-0000n.safetensors` shards and `model.safetensors.index.json`, and pairs deliberately split so that a
scale lives in an earlier shard than its weight and another in a later one.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3.errors import CheckpointError
from dsv3.io.checkpoint import load_plain
from dsv3.io.load import load_for_inference, load_model
from dsv3.parallel import ParallelConfig
from dsv3.parallel.load import load_sharded
from dsv3.quant.linear import QuantLinear
from dsv3.quant.schemes import quantize_fp8_block
from tiny_model import make_tiny_model_dir


def write_shards(tensors: dict, out, shards: list[list[str]]) -> None:
    n = len(shards)
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: tensors[k] for k in names}, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, fname))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    src = make_tiny_model_dir(tmp_path_factory.mktemp("fp8src"))
    out = tmp_path_factory.mktemp("fp8split")
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    tensors = {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        if name.endswith("_proj.weight") or name.endswith("proj_with_mqa.weight"):
            tensors[name], tensors[name + "_scale_inv"] = quantize_fp8_block(t)
        else:
            tensors[name] = t.bfloat16() if t.dim() >= 2 else t
    names = sorted(tensors)
    split_late = "model.layers.0.self_attn.kv_b_proj.weight_scale_inv"  # scale in the shard after its weight's
    split_early = "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"  # scale in the shard before its weight's
    rest = [n for n in names if n not in (split_late, split_early)]
    half = len(rest) // 2
    first = [n for n in rest[:half] if n != split_early.removesuffix("_scale_inv")] + [split_early]
    second = [n for n in rest[half:] if n != split_late.removesuffix("_scale_inv")] + [split_late]
    third = [split_late.removesuffix("_scale_inv"), split_early.removesuffix("_scale_inv")]
    write_shards(tensors, out, [first, second, third])
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (out / "config.json").write_text(json.dumps(cfg))
    whole = tmp_path_factory.mktemp("fp8whole")  # the same tensors in one file: the oracle
    for f in out.iterdir():
        if f.name == "config.json" or f.suffix == ".json" and "index" not in f.name:
            (whole / f.name).write_bytes(f.read_bytes())
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            (whole / f.name).write_bytes(f.read_bytes())
    save_file(tensors, str(whole / "model.safetensors"), metadata={"format": "pt"})
    return out, whole


def test_the_pairs_are_split_as_released(split_dir):
    out, _ = split_dir
    wm = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    split = [n for n in wm if n.endswith("weight_scale_inv") and wm[n] != wm[n.removesuffix("_scale_inv")]]
    assert {"model.layers.0.self_attn.kv_b_proj.weight_scale_inv", "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"} <= set(split)


@torch.no_grad()
def test_split_pairs_load_plain_packed_and_sharded(split_dir):
    out, whole = split_dir
    ids = torch.randint(3, 200, (2, 12))
    ref = load_model(whole, dtype="fp32", progress=False)(ids)
    torch.testing.assert_close(load_plain(out, dtype="fp32", progress=False)(ids), ref, rtol=0, atol=0)
    packed = load_for_inference(out, dtype="fp32", quantization="fp8")
    assert isinstance(packed.model.layers[0].self_attn.kv_b_proj, QuantLinear)
    torch.testing.assert_close(packed(ids), ref, rtol=1e-5, atol=1e-5)
    for tp, ep in ((2, 1), (1, 2)):
        for r in range(2):  # every rank finds its scales, wherever the shards put them
            load_sharded(out, ParallelConfig(tp, ep, r), "fp32", progress=False)
            load_sharded(out, ParallelConfig(tp, ep, r), "fp32", progress=False, quantization="fp8")


def test_a_scale_in_no_shard_is_named(split_dir, tmp_path):
    out, _ = split_dir
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in out.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    name = "model.layers.0.self_attn.kv_b_proj.weight_scale_inv"
    shard = broken / index["weight_map"].pop(name)
    t = load_file(str(shard))
    t.pop(name)
    save_file(t, str(shard))
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"FP8 tensor 'model\.layers\.0\.self_attn\.kv_b_proj\.weight' has no"):
        load_model(broken, progress=False)
