"""The anchors every engine benchmark runs next to dsv3: HF transformers and llama.cpp (llama-cpp-python).

llama.cpp gets a GGUF converted from the same HF checkpoint by the converter that
llama-cpp-python's source distribution carries (`vendor/llama.cpp/convert_hf_to_gguf.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch


class HFRunner:
    """HF transformers `generate`, greedy, fp32, eager attention."""

    name = "transformers"

    def __init__(self, model_dir: Path):
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new: int) -> float:
        """Left-padded batch; returns seconds for `max_new` tokens per prompt."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        t = time.perf_counter()
        self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                            do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    @torch.inference_mode()
    def ttft(self, prompt: list[int]) -> float:
        t = time.perf_counter()
        self.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=1, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t


def llama_cpp_source(cache: Path) -> Path | None:
    """Unpack llama-cpp-python's sdist (from pip's cache or the index) to reach its GGUF converter."""
    target = cache / "llama-cpp-src"
    if (target / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").exists():
        return target
    unpacked = sorted(cache.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if unpacked:
        return unpacked[-1].parents[2]
    cache.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(cache),
                        "llama-cpp-python==0.3.36"], capture_output=True, text=True)
    sdists = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
    if r.returncode or not sdists:
        return None
    with tarfile.open(sdists[-1]) as tar:
        tar.extractall(cache, filter="data")
    (cache / sdists[-1].name.removesuffix(".tar.gz")).rename(target)
    return target


def _with_kv_heads(model_dir: Path, stage: Path) -> Path:
    """The checkpoint with `num_key_value_heads` in config.json (a linked copy), when it lacks it.

    The converter reads the config through transformers, whose DeepseekV3Config defaults the key to
    128 (V3's head count) whatever `num_attention_heads` is, and then fails splitting kv_b_proj
    into per-head K/V (`assert data_torch.shape[0] == n_head_kv * (v_head_dim + qk_nope_head_dim)`).
    MLA's key/value head count is the attention head count.
    """
    cfg = json.loads((model_dir / "config.json").read_text())
    if "num_key_value_heads" in cfg:
        return model_dir
    stage.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.name != "config.json" and not (stage / f.name).exists():
            (stage / f.name).symlink_to(f.resolve())
    (stage / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": cfg["num_attention_heads"]}, indent=2))
    return stage


def convert_gguf(model_dir: Path, gguf: Path, outtype: str, cache: Path) -> Path:
    """HF checkpoint -> GGUF (`outtype` f32 | f16 | bf16 | q8_0) with the converter llama-cpp-python's sdist carries."""
    if gguf.exists():
        return gguf
    src = llama_cpp_source(cache)
    if src is None:
        raise RuntimeError("llama-cpp-python's source distribution (for the GGUF converter) is not available")
    vendor = src / "vendor" / "llama.cpp"
    env = {**os.environ, "PYTHONPATH": f"{vendor}:{vendor / 'gguf-py'}"}
    stage = gguf.with_suffix(".hf")
    model_dir = _with_kv_heads(model_dir, stage)
    # The converter identifies BPE pre-tokenizers by hashing token ids of a probe text, which no
    # tokenizer trained here can match; ours is byte-level BPE, i.e. llama.cpp's "gpt-2". Prompts
    # are given as token ids, so the pre-tokenizer never runs in the benchmark.
    wrapper = ("import runpy, sys; from conversion import base; "
               "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2'; "
               f"sys.argv = ['convert_hf_to_gguf.py'] + sys.argv[1:]; runpy.run_path({str(vendor / 'convert_hf_to_gguf.py')!r}, run_name='__main__')")
    tmp = gguf.with_suffix(".part")
    r = subprocess.run([sys.executable, "-c", wrapper, str(model_dir), "--outfile", str(tmp), "--outtype", outtype],
                       env=env, capture_output=True, text=True)
    shutil.rmtree(stage, ignore_errors=True)
    if r.returncode:
        raise RuntimeError(f"GGUF conversion failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    tmp.rename(gguf)
    return gguf


def open_llama(gguf: Path, **kwargs):
    """`llama_cpp.Llama` with llama.cpp's extra (repacking) weight buffers off.

    On CPUs with AMX, llama.cpp puts F16 / Q8_0 / Q4_K weights whose test matmul the AMX kernels
    accept into the AMX buffer type; MLA then multiplies the per-head `attn_k_b` (F16 in the F16
    GGUF) by a permuted, non-contiguous query view, which AMX rejects and the plain CPU backend
    cannot read from an AMX buffer, so graph scheduling aborts with
    `GGML_ASSERT(*cur_backend_id != -1)` (ggml-backend.cpp). llama-cpp-python does not expose
    `use_extra_bufts`, so it is switched off in the default model parameters for this call.
    """
    from llama_cpp import Llama
    from llama_cpp import llama as llama_mod

    default = llama_mod.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_mod.llama_cpp.llama_model_default_params = params
    try:
        return Llama(model_path=str(gguf), **kwargs)
    finally:
        llama_mod.llama_cpp.llama_model_default_params = default


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python on a GGUF converted from the same checkpoint."""

    name = "llama.cpp"

    def __init__(self, model_dir: Path, outtype: str, cache: Path, threads: int):
        gguf = convert_gguf(model_dir, cache / f"{model_dir.name}-{outtype}.gguf", outtype, cache)
        self.name = f"llama.cpp {outtype.upper()}"
        self.llm = open_llama(gguf, n_ctx=4096, n_threads=threads, n_batch=512, verbose=False)

    def generate(self, prompts: list[list[int]], max_new: int | list[int]) -> float:
        """Sequential (llama-cpp-python serves one sequence at a time); seconds for all prompts."""
        lens = max_new if isinstance(max_new, list) else [max_new] * len(prompts)
        t = time.perf_counter()
        for p, m in zip(prompts, lens):
            self.llm.reset()
            n = 0
            for _ in self.llm.generate(p, top_k=1, temp=0.0, reset=True):
                n += 1
                if n == m:
                    break
        return time.perf_counter() - t

    def ttft(self, prompt: list[int]) -> float:
        """Time to the first token; llama.cpp reuses the longest matching prefix of its last evaluation."""
        t = time.perf_counter()
        next(iter(self.llm.generate(prompt, top_k=1, temp=0.0, reset=False)))
        return time.perf_counter() - t
