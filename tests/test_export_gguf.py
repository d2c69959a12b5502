"""`dsv3 export gguf`: the file llama.cpp runs.

Fast tests check the Q8_0 blocks against ggml's reference rounding and the file's layout with an independent
reader (struct unpacking of the GGUF v3 header, key/values and tensor table). The slow test is the oracle: it
builds llama-cpp-python (llama.cpp compiled from source, minutes on 2 cores) into a gitignored venv
`.venv-llama`, loads the exported f32, f16 and q8_0 files with `llama_cpp.Llama` and compares the logits it
computes for a prompt with dsv3's on a dense-prefix DeepSeek-V3 model (MLA with compressed queries, YaRN, a dense
layer, grouped sigmoid routing with correction bias, shared experts).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dsv3.cli as cli
from dsv3.io.gguf import QK8_0, dequantize_q8_0, quantize_q8_0
from dsv3.io.load import load_model
from tiny_model import make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
LLAMA_VENV = ROOT / ".venv-llama"
LLAMA_PIN = "llama-cpp-python==0.3.36"
DIMS = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=32,
            qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, num_attention_heads=4, n_group=2, topk_group=1)


def read_gguf(path: Path) -> tuple[dict, dict]:
    """An independent GGUF v3 reader: (metadata, {tensor: (ggml type, numpy shape, offset)})."""
    data = path.read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v[0] if len(v) == 1 else v

    def string():
        nonlocal pos
        n = take("<Q")
        s = data[pos:pos + n].decode()
        pos += n
        return s
    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}

    def value(kind):
        if kind == 8:
            return string()
        if kind == 9:
            sub, n = take("<I"), take("<Q")
            return [value(sub) for _ in range(n)]
        return take(scalar[kind])
    assert data[:4] == b"GGUF"
    pos = 4
    version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
    assert version == 3
    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("<I"))
    tensors = {}
    for _ in range(n_tensors):
        name = string()
        dims = [take("<Q") for _ in range(take("<I"))]
        tensors[name] = (take("<I"), tuple(reversed(dims)), take("<Q"))
    return meta, tensors


def test_q8_0_blocks_are_ggml_reference_rounding():
    torch.manual_seed(0)
    w = torch.randn(6, 96) * 3
    raw = quantize_q8_0(w)
    assert len(raw) == w.numel() // QK8_0 * 34  # 2-byte fp16 scale + 32 int8 per block
    back = dequantize_q8_0(raw, (6, 96))
    blocks = w.view(-1, QK8_0)
    d = (blocks.abs().amax(-1) / 127).half().float()  # ggml stores d in fp16 and rounds x / d_fp32
    ref = torch.round(blocks / (blocks.abs().amax(-1, keepdim=True) / 127)) * d[:, None]
    torch.testing.assert_close(back, ref.view(6, 96), rtol=0, atol=0)
    assert ((back - w).abs() <= d.repeat_interleave(QK8_0).view(6, 96) * 0.5 + 1e-3).all()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("gguf"), **DIMS)


def test_export_writes_llama_cpps_deepseek2_layout(model_dir, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert cli.main(["export", "gguf", "--model", str(model_dir), "-o", str(out), "--type", "q8_0"]) == 0
    assert "gguf q8_0: wrote" in capsys.readouterr().err
    meta, tensors = read_gguf(out)
    cfg = json.loads((model_dir / "config.json").read_text())
    assert meta["general.architecture"] == "deepseek2" and meta["general.file_type"] == 7
    assert meta["deepseek2.leading_dense_block_count"] == 1 and meta["deepseek2.attention.head_count_kv"] == 1
    assert meta["deepseek2.attention.key_length"] == cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    assert meta["deepseek2.rope.scaling.type"] == "yarn" and meta["deepseek2.expert_gating_func"] == 2
    assert len(meta["tokenizer.ggml.tokens"]) == cfg["vocab_size"] and meta["tokenizer.ggml.model"] == "gpt2"
    H, dn, dv, r = 4, 32, 32, 32
    assert tensors["blk.0.attn_k_b.weight"][:2] == (8, (H, r, dn)) and tensors["blk.0.attn_v_b.weight"][1] == (H, dv, r)
    assert tensors["blk.1.ffn_gate_exps.weight"][1] == (8, 32, 64) and tensors["blk.1.ffn_gate_inp.weight"][0] == 0
    assert tensors["blk.1.exp_probs_b.bias"][0] == 0 and tensors["blk.0.attn_norm.weight"][0] == 0
    assert not any(n.startswith("blk.2.") for n in tensors)  # the MTP layer is not exported
    offsets = sorted(t[2] for t in tensors.values())
    assert all(o % 32 == 0 for o in offsets)


def test_bad_input_is_one_line(model_dir, tmp_path, capsys):
    assert cli.main(["export", "gguf", "--model", str(model_dir), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is an existing directory" in err and "\n" not in err
    with pytest.raises(SystemExit) as e:
        cli.main(["export", "gguf", "--model", str(model_dir), "-o", str(tmp_path / "x.gguf"), "--type", "q4_k"])
    assert e.value.code == 2



def test_fp8_release_exports_dequantized_and_quantized_files_are_refused(model_dir, tmp_path, capsys):
    """DeepSeek's FP8 layout (weight_scale_inv per 128x128 block) is dequantized into the file: the same tensors as
    exporting its dequantized checkpoint. A `dsv3 quantize` output is refused in one line before it is loaded."""
    from safetensors.torch import load_file, save_file

    from test_checkpoint import fp8_quantize

    fp8, deq = tmp_path / "fp8" / "m", tmp_path / "deq" / "m"  # one directory name: the same general.name key
    for d in (fp8, deq):
        d.mkdir(parents=True)
        for f in model_dir.iterdir():
            if f.name != "model.safetensors":
                (d / f.name).write_bytes(f.read_bytes())
    packed, plain = {}, {}
    for name, w in load_file(str(model_dir / "model.safetensors")).items():
        if w.ndim == 2 and name.endswith("proj.weight"):
            q, s = fp8_quantize(w.float())
            packed[name], packed[name + "_scale_inv"] = q, s
            plain[name] = q.float() * s.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
        else:
            packed[name] = plain[name] = w
    save_file(packed, str(fp8 / "model.safetensors"))
    save_file(plain, str(deq / "model.safetensors"))
    cfg = json.loads((fp8 / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    (fp8 / "config.json").write_text(json.dumps(cfg))
    for d in (fp8, deq):
        assert cli.main(["export", "gguf", "--model", str(d), "-o", str(d.parent / "m.gguf"), "--type", "f32"]) == 0
    a, b = (fp8.parent / "m.gguf").read_bytes(), (deq.parent / "m.gguf").read_bytes()
    _, ta = read_gguf(fp8.parent / "m.gguf")
    assert a == b and "blk.0.attn_k_b.weight" in ta  # byte for byte the file of the dequantized checkpoint
    capsys.readouterr()
    q = tmp_path / "int8"
    assert cli.main(["quantize", "--method", "int8", "--model", str(model_dir), "-o", str(q)]) == 0
    capsys.readouterr()
    assert cli.main(["export", "gguf", "--model", str(q), "-o", str(tmp_path / "q.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "quantized checkpoint (dsv3)" in err and "\n" not in err and not (tmp_path / "q.gguf").exists()


def llama_python() -> Path:
    """The venv with llama-cpp-python (built from source by pip on first use; gitignored)."""
    py = LLAMA_VENV / "bin" / "python"
    if not (LLAMA_VENV / ".installed").is_file():
        subprocess.run([sys.executable, "-m", "venv", str(LLAMA_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", LLAMA_PIN, "numpy"], check=True,
                       env={**os.environ, "CMAKE_ARGS": "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"})
        (LLAMA_VENV / ".installed").touch()
    return py


LLAMA_SCRIPT = r"""
import sys, numpy as np
from llama_cpp import Llama
from llama_cpp import llama as llama_mod
default = llama_mod.llama_cpp.llama_model_default_params
def params():  # llama.cpp's AMX repacking buffers reject MLA's permuted views (see bench/anchors.py)
    p = default(); p.use_extra_bufts = False; return p
llama_mod.llama_cpp.llama_model_default_params = params
ids = [int(t) for t in sys.argv[2].split(",")]
llm = Llama(model_path=sys.argv[1], n_ctx=128, n_batch=128, logits_all=True, n_threads=1, verbose=False,
            type_k=0, type_v=0)  # an F32 KV cache: llama.cpp's default F16 cache rounds the latents (4e-3 of the spread)
llm.eval(ids)
np.save(sys.argv[3], np.array(llm.scores[:len(ids)], dtype=np.float32))
"""


@pytest.mark.slow
@pytest.mark.parametrize("qtype,bound", [("f32", 1e-4), ("f16", 0.03), ("q8_0", 0.25)])
def test_llama_cpp_runs_the_export_with_dsv3s_logits(model_dir, tmp_path, qtype, bound):
    """llama.cpp's logits for a 24-token prompt against dsv3's (an F32 KV cache on both sides): f32 to 1e-4 of the
    logits' spread (float accumulation order), f16 within a few hundredths (llama.cpp rounds activations to the
    weights' type), and the same next-token argmax at (almost) every position. For q8_0 the oracle is dsv3 running
    the weights the file holds (every exported matrix through Q8_0 and back): on a tiny random model a Q8_0 weight
    moves some tokens' expert choice, and then the logits of the original weights differ by ~3x their spread in
    dsv3 itself as in llama.cpp; what remains is llama.cpp's Q8_0 rounding of activations."""
    from dsv3.io.gguf import dequantize_q8_0, quantize_q8_0

    py = llama_python()
    out = tmp_path / f"m-{qtype}.gguf"
    assert cli.main(["export", "gguf", "--model", str(model_dir), "-o", str(out), "--type", qtype]) == 0
    ids = torch.randint(3, 200, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    script = tmp_path / "run.py"
    script.write_text(LLAMA_SCRIPT)
    r = subprocess.run([str(py), str(script), str(out), ",".join(map(str, ids)), str(tmp_path / "l.npy")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got = torch.from_numpy(np.load(tmp_path / "l.npy"))
    model = load_model(model_dir, dtype="fp32", with_mtp=False, progress=False)
    with torch.no_grad():
        exact = model(torch.tensor([ids]))[0]
        if qtype == "q8_0":
            for name, p in model.named_parameters():
                if p.dim() >= 2 and not name.endswith("mlp.gate.weight") and p.shape[-1] % QK8_0 == 0:
                    p.copy_(dequantize_q8_0(quantize_q8_0(p), tuple(p.shape)))
        want = model(torch.tensor([ids]))[0]
    scale = want.std().item()
    err = (got - want).abs().max().item() / scale
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"{qtype}: max |llama.cpp - dsv3| = {err:.2e} x logit std; argmax agree {agree:.3f}"
          + (f" (against the unrounded weights: {(got - exact).abs().max().item() / scale:.2e})" if qtype == "q8_0" else ""))
    assert err <= bound
    assert agree >= (1.0 if qtype == "f32" else 0.9)
