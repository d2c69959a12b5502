"""Tensor / expert parallelism over quantized checkpoints: packed weights, scales and zero points cut along the same
splits, 2 ranks over gloo, logits equal to one process loading the same files.

Checkpoints: `dsv3 quantize` int8 (embedding and head quantized), AWQ int4 g32 (int8 head, int4 embedding), an
AutoAWQ GEMM, a GPTQ and a compressed-tensors pack-quantized file (written by test_quant_foreign's packer) and an FP8 one kept in FP8 (`quantization="fp8"`),
whose 128-blocks do not align with this tiny model's shard boundaries, so its cut layers run dense from the
exactly dequantized slices. Activations enter the int4/int8 kernels in fp32 here (`KERNEL_ACT_DTYPE = None`), so
one process and the ranks compute the same sums up to fp32 rounding.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dsv3.io.load import load_for_inference
from dsv3.parallel import ParallelConfig

LAYOUTS = [(2, 1), (1, 2), (2, 2)]  # (tp, ep)
WIDTHS = dict(q_lora_rank=32, moe_intermediate_size=64, intermediate_size=128)  # TP=2 cuts fall on 32-groups
CKPTS = ["int8", "awq", "autoawq", "gptq", "compressed-tensors", "fp8"]


def _rank_main(rank: int, port: int, dirs: list[str], out: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from dsv3.parallel import dist as pdist
    from dsv3.parallel.load import load_sharded
    from dsv3.quant import kernels as kn
    from test_parallel_model import forward_both

    kn.KERNEL_ACT_DTYPE = None
    torch.set_num_threads(1)
    pdist.init(rank, 2, "cpu", "127.0.0.1", port)
    results = {}
    try:
        for d in dirs:
            ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(1))
            for tp, ep in LAYOUTS:
                model = load_sharded(d, ParallelConfig(tp, ep, rank), "fp32", progress=False,
                                     quantization="fp8" if Path(d).name == "fp8" else None)
                res = forward_both(model, ids)
                res["types"] = {n: type(model.get_submodule(n)).__name__ for n in
                                ("model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.kv_b_proj", "model.layers.1.mlp.experts",
                                 "model.layers.0.mlp.down_proj", "lm_head")}
                results[(Path(d).name, tp, ep)] = res
    finally:
        pdist.shutdown()
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from test_quant_foreign import write_packed
    from tiny_model import make_tiny_model_dir
    from dsv3.io.load import load_model
    from dsv3.quant import quantize_model, save_quantized
    from dsv3.quant.apply import default_policy

    root = tmp_path_factory.mktemp("pq")
    base = make_tiny_model_dir(root / "base", **WIDTHS)
    calib = torch.randint(3, 200, (4, 32), generator=torch.Generator().manual_seed(0))
    for method in ("int8", "awq", "fp8"):
        model = load_model(base, progress=False)
        head, emb = default_policy(method)
        quantize_model(model, method, group_size=32, calib=calib if method == "awq" else None, include_lm_head=head,
                       embedding=emb or False, progress=False)
        save_quantized(model, root / method, tokenizer_from=base)
    write_packed(base, root / "autoawq", "awq", 32, False)
    write_packed(base, root / "gptq", "gptq", 32, False)  # asymmetric, no act-order
    write_packed(base, root / "compressed-tensors", "compressed-tensors", 32, True)  # Kimi-K2-Thinking's: experts only
    return {name: root / name for name in CKPTS}


@pytest.fixture(scope="module")
def results(ckpts, tmp_path_factory):
    from dsv3.parallel.dist import free_port

    out = tmp_path_factory.mktemp("pq-out")
    mp.spawn(_rank_main, args=(free_port(), [str(ckpts[n]) for n in CKPTS], str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def reference(ckpts):
    from dsv3.quant import kernels as kn
    from test_parallel_model import forward_both

    old, kn.KERNEL_ACT_DTYPE = kn.KERNEL_ACT_DTYPE, None
    try:
        ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(1))
        return {n: forward_both(load_for_inference(ckpts[n], dtype="fp32", quantization="fp8" if n == "fp8" else None), ids)
                for n in CKPTS}
    finally:
        kn.KERNEL_ACT_DTYPE = old


@pytest.mark.parametrize("name", CKPTS)
@pytest.mark.parametrize("tp,ep", LAYOUTS)
def test_quantized_parallel_logits_match_one_process(results, reference, name, tp, ep):
    for r in range(2):
        got = results[r][(name, tp, ep)]
        for form in ("full", "decode"):
            torch.testing.assert_close(got[form], reference[name][form], rtol=1e-4, atol=1e-4, msg=f"{name} {form} rank {r}")


@pytest.mark.parametrize("name", ["int8", "awq", "autoawq", "gptq", "compressed-tensors"])
def test_ranks_hold_packed_shards(results, name):
    """Under TP the attention output, the MLP and the head are the packed parallel layers; experts stay packed."""
    types = results[0][(name, 2, 1)]["types"]
    if name == "compressed-tensors":  # only the routed experts are packed (the rest ignored, as Kimi-K2-Thinking ships)
        assert types["model.layers.1.mlp.experts"] == "QuantExperts" and types["lm_head"] == "ParallelHead"
        assert results[0][(name, 1, 2)]["types"]["model.layers.1.mlp.experts"] == "QuantExperts"
        return
    assert types["model.layers.0.self_attn.o_proj"] == "QuantRowParallelLinear"
    assert types["model.layers.0.self_attn.kv_b_proj"] == "QuantColumnParallelLinear"
    assert types["model.layers.0.mlp.down_proj"] == "QuantRowParallelLinear"
    assert types["model.layers.1.mlp.experts"] == "QuantExperts"
    assert types["lm_head"] == ("QuantParallelHead" if name in ("int8", "awq") else "ParallelHead")
    assert results[0][(name, 1, 2)]["types"]["model.layers.1.mlp.experts"] == "QuantExperts"


def test_fp8_cut_inside_a_block_runs_dense_and_on_the_fly_quantization_is_refused(results, ckpts):
    from dsv3.parallel.dist import ParallelError
    from dsv3.parallel.load import load_sharded

    types = results[0][("fp8", 2, 1)]["types"]
    assert types["model.layers.0.self_attn.o_proj"] == "RowParallelLinear"  # 64 inputs cut at 32: inside a 128-block
    assert results[0][("fp8", 1, 2)]["types"]["model.layers.1.mlp.experts"] == "QuantExperts"  # EP cuts no matrix
    with pytest.raises(ParallelError, match="dsv3 quantize --method int8"):
        load_sharded(ckpts["int8"].parent / "base", ParallelConfig(2, 1, 0), "fp32", progress=False, quantization="int8")


@pytest.mark.slow
def test_the_requests_deployment_command_as_written(tmp_path):
    """docs/deployment.md's "The request's deployment command", run as written there: `dsv3 quantize --method awq`
    on the embedded model, then `dsv3 serve --tensor-parallel-size 4 --quantization awq --max-model-len 131072`
    (4 ranks over gloo on this CPU), answering the OpenAI client with what one process generates from the same files.
    Only paths and the port are filled in."""
    import os
    import shlex
    import socket
    import subprocess
    import time

    import httpx
    import openai

    from dsv3 import LLM, SamplingParams
    from dsv3.io.paths import default_model_dir

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "deployment.md").read_text()
    section = doc[doc.index("### The request's deployment command"):]
    lines = [ln for ln in section.split("```bash", 1)[1].split("```", 1)[0].splitlines() if ln.startswith("dsv3 ")]
    quantize, serve = (shlex.split(ln)[1:] for ln in lines)
    assert quantize[:2] == ["quantize", "--method"] and serve[0] == "serve"
    assert " ".join(serve[3:]) == "--tensor-parallel-size 4 --quantization awq --max-model-len 131072"
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    calib = tmp_path / "calib.txt"
    calib.write_text("".join(p.read_text() for p in sorted((root / "src" / "dsv3" / "engine").glob("*.py"))))
    out = tmp_path / "default-awq"
    fill = {"src/dsv3/data/default": str(default_model_dir()), "default-awq": str(out), "calib.txt": str(calib)}
    quantize = [fill.get(a, a) for a in quantize] + ["--calib-samples", "2", "--calib-seq-len", "64"]  # quick calibration
    r = subprocess.run([sys.executable, "-m", "dsv3", *quantize], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dsv3", *[fill.get(a, a) for a in serve], "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(1)
        else:
            pytest.fail("server did not become healthy")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
        got = client.completions.create(model=out.name, prompt="def fibonacci(n):", max_tokens=16, temperature=0)
        expected = LLM(out, quantization="awq").generate("def fibonacci(n):", SamplingParams(max_tokens=16, temperature=0))
        assert got.choices[0].text == expected[0].outputs[0].text and got.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=60)
