"""llama.cpp rows of the quantization table: F16, Q8_0 and Q4_K_M GGUFs of the same HF checkpoint.

F16 and Q8_0 come straight from the converter llama-cpp-python's sdist carries (`anchors.convert_gguf`);
Q4_K_M is llama.cpp's own quantizer (`llama_model_quantize`, what its `llama-quantize` tool calls)
applied to the F32 conversion. Quality is scored on the same token windows as dsv3, from the logits
of every position (`logits_all=True`) with an F32 KV cache, so that only the weights differ from
dsv3's fp32 reference. Speed runs in a fresh process with llama.cpp's default (F16) KV cache:

    python bench/quant_llama.py GGUF THREADS     # prints {"decode_b1", "peak_rss", "model_bytes"} as JSON
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anchors import convert_gguf, llama_cpp_source, open_llama  # noqa: E402

ANCHORS = {"llama-f16": "f16", "llama-q8_0": "q8_0", "llama-q4_k_m": "q4_k_m"}
LABELS = {"llama-f16": "llama.cpp F16", "llama-q8_0": "llama.cpp Q8_0", "llama-q4_k_m": "llama.cpp Q4_K_M"}


def make_gguf(model_dir: Path, kind: str, cache: Path, threads: int = 2, out_dir: Path | None = None) -> Path:
    """The GGUF of `model_dir` in `kind` (f32 | f16 | q8_0 | q4_k_m), kept in `out_dir` (default: `cache`, where
    llama-cpp-python's source lives) under the weights' hash."""
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f.read_bytes())
    key = h.hexdigest()[:12]
    out = (out_dir or cache) / f"quant-{model_dir.resolve().name}-{key}-{kind}.gguf"
    if out.exists() or kind != "q4_k_m":
        return convert_gguf(model_dir, out, kind, cache)
    import llama_cpp

    src = make_gguf(model_dir, "f32", cache, threads, out_dir)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, threads
    tmp = out.with_suffix(".part")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> Q4_K_M failed")
    tmp.rename(out)
    return out


def linear_ratio(gguf: Path, cache: Path) -> float:
    """Bytes of the GGUF's decoder matrices (attention, MLP, experts; not router, norms, embeddings or
    head) over the same matrices' bytes in bf16."""
    src = llama_cpp_source(cache)
    sys.path.insert(0, str(src / "vendor" / "llama.cpp" / "gguf-py"))
    from gguf import GGUFReader

    got = ref = 0
    for t in GGUFReader(str(gguf)).tensors:
        if t.name.startswith("blk.") and len(t.shape) >= 2 and ".ffn_gate_inp." not in t.name:
            got, ref = got + int(t.n_bytes), ref + 2 * int(t.n_elements)
    return got / ref


class LlamaScorer:
    """All-position logits of a token window from llama.cpp (one window at a time, cache reset)."""

    def __init__(self, gguf: Path, n_ctx: int, threads: int):
        import llama_cpp

        self.llm = open_llama(gguf, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads, logits_all=True,
                              type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)

    def __call__(self, ids: list[int]) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(ids)
        return torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32))


def run_speed(gguf: Path, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, str(gguf), str(threads)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _speed_main(gguf: str, threads: int) -> None:
    llm = open_llama(Path(gguf), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    rng = np.random.default_rng(0)

    def decode(steps: int, prompt: int = 32) -> float:
        llm.reset()
        it = llm.generate(rng.integers(3, 1000, prompt).tolist(), top_k=1, temp=0.0, reset=True)
        next(it)  # prefill and the first token
        t = time.perf_counter()
        for _ in range(steps):
            next(it)
        return steps / (time.perf_counter() - t)

    decode(4)
    b1 = max(decode(48) for _ in range(2))
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"decode_b1": b1, "peak_rss": peak, "model_bytes": Path(gguf).stat().st_size}))


if __name__ == "__main__":
    _speed_main(sys.argv[1], int(sys.argv[2]))
