"""Sharded loading in one process (no collectives needed to load): the ranks' slices reassemble the full model.

Covers an FP8 checkpoint with a block size that does not align with the shard boundaries, so
`narrow_fp8` has to dequantize partial scale blocks on both sides of a cut.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3.io.checkpoint import dequantize_fp8
from dsv3.io.load import load_model
from dsv3.parallel import ParallelConfig
from dsv3.layers.moe import Experts
from dsv3.parallel.layers import Shard
from dsv3.parallel.load import load_sharded, narrow_fp8
from dsv3.parallel.shard import owners

BLOCK = (24, 20)


def to_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise e4m3 with scale_inv per BLOCK tile (DeepSeek's layout, smaller blocks)."""
    bn, bk = BLOCK
    N, K = w.shape
    gn, gk = -(-N // bn), -(-K // bk)
    pad = torch.zeros(gn * bn, gk * bk)
    pad[:N, :K] = w.float()
    tiles = pad.view(gn, bn, gk, bk)
    scale = (tiles.abs().amax(dim=(1, 3)) / 448).clamp(min=1e-12)
    q = (tiles / scale[:, None, :, None]).view(gn * bn, gk * bk)[:N, :K].to(torch.float8_e4m3fn)
    return q, scale


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory) -> Path:
    from hf_oracle import build_hf_model

    d = tmp_path_factory.mktemp("fp8")
    build_hf_model("v3_yarn_groups").save_pretrained(d)
    tensors = load_file(d / "model.safetensors")
    out = {}
    for name, t in tensors.items():
        if name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight"):
            out[name], out[name + "_scale_inv"] = to_fp8(t)
        else:
            out[name] = t
    save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(BLOCK)}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_narrow_fp8_equals_dequantize_then_cut():
    w, s = to_fp8(torch.randn(70, 53))
    full = dequantize_fp8(w, s, BLOCK, "w")
    for dim, start, end in [(0, 0, 35), (0, 35, 70), (0, 13, 50), (1, 7, 41), (1, 40, 53)]:
        torch.testing.assert_close(narrow_fp8(w, s, BLOCK, (dim, start, end), "w"), full.narrow(dim, start, end - start), rtol=0, atol=0)


def reassemble(full_model, ranks: list) -> int:
    """Every sharded parameter of the full model equals its ranks' slices put back together; returns the count checked."""
    full = dict(full_model.named_parameters())
    checked = 0
    for name, owner in owners(ranks[0]).items():
        parts = [dict(m.named_parameters())[name] for m in ranks]
        if isinstance(owner, Experts):
            if owner.inter_shard is None:
                whole = torch.cat(parts, 0)
            elif name.endswith("down_proj"):
                whole = torch.cat(parts, 2)
            else:
                halves = [p.chunk(2, dim=1) for p in parts]
                whole = torch.cat([h[0] for h in halves] + [h[1] for h in halves], 1)
        else:
            assert isinstance(owner.shard, Shard)
            whole = torch.cat(parts, owner.shard.dim)
        torch.testing.assert_close(whole, full[name], rtol=0, atol=0, msg=name)
        checked += 1
    return checked


@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2), (2, 2)])
def test_fp8_shards_reassemble_full_model(fp8_dir, tp, ep):
    full = load_model(fp8_dir, dtype="fp32", progress=False)
    ranks = [load_sharded(fp8_dir, ParallelConfig(tp, ep, r), "fp32", progress=False) for r in range(2)]
    n = reassemble(full, ranks)
    assert n >= (2 if tp == 1 else 12)  # experts of both MoE layers at least; TP adds attention, MLPs, vocab
    for m in ranks:  # replicated parts are whole copies
        torch.testing.assert_close(m.model.layers[1].mlp.gate.weight, full.model.layers[1].mlp.gate.weight, rtol=0, atol=0)
        if tp > 1:
            assert m.model.layers[0].self_attn.n_heads == full.model.layers[0].self_attn.n_heads // 2


def test_missing_expert_is_reported(tmp_path, fp8_dir):
    from dsv3.errors import CheckpointError

    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text((fp8_dir / "config.json").read_text())
    tensors = load_file(fp8_dir / "model.safetensors")
    tensors = {k: v for k, v in tensors.items() if ".experts.7." not in k}
    save_file(tensors, str(d / "model.safetensors"))
    load_sharded(d, ParallelConfig(1, 2, 0), "fp32", progress=False)  # rank 0 holds experts 0-3: fine
    with pytest.raises(CheckpointError, match="experts"):
        load_sharded(d, ParallelConfig(1, 2, 1), "fp32", progress=False)
