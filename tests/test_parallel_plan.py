"""`dsv3 plan` arithmetic against the real thing: module bytes of actual (parallel, quantized) models, the engine's cache."""

from __future__ import annotations

import pytest
import torch

from dsv3.cli import _Parser
from dsv3.commands import plan as plan_cmd
from dsv3.config import ModelConfig
from dsv3.errors import ConfigError
from dsv3.models.deepseek_v3 import DeepseekV3ForCausalLM
from dsv3.parallel import ParallelConfig, ParallelError
from dsv3.parallel.load import build_local_model
from dsv3.parallel.shard import parallelize
from dsv3.parallel.sizing import plan

TINY = dict(model_type="deepseek_v3", vocab_size=512, hidden_size=256, intermediate_size=384, moe_intermediate_size=128,
            num_hidden_layers=3, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32,
            qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
            n_group=2, topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=256)
DSA = dict(model_type="deepseek_v32", index_n_heads=4, index_head_dim=32, index_topk=64)  # V3.2's indexer


def nbytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) - (
        model.lm_head.weight.numel() * model.lm_head.weight.element_size() if model.config.tie_word_embeddings else 0)


@pytest.mark.parametrize("devices,tied,q_lora,dsa", [(1, False, 128, False), (2, False, 128, False), (4, True, None, False),
                                                     (1, False, 128, True), (2, False, 128, True)])
def test_weights_equal_parallel_model_bytes(devices, tied, q_lora, dsa):
    cfg = ModelConfig.from_dict({**TINY, "tie_word_embeddings": tied, "q_lora_rank": q_lora, **(DSA if dsa else {})})
    for rank in range(devices):
        with torch.device("meta"):
            model = parallelize(DeepseekV3ForCausalLM(cfg), ParallelConfig(devices, devices, rank))
        model.cast(torch.bfloat16)
        assert plan(cfg, devices, dtype="bf16").weights == nbytes(model)


@pytest.mark.parametrize("method,dsa", [("int8", False), ("fp8", False), ("int8", True)])
def test_quantized_weights_equal_quantized_model_bytes(method, dsa):
    from dsv3.quant.apply import quantize_model

    cfg = ModelConfig.from_dict({**TINY, **(DSA if dsa else {})})
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg)
    model.init_weights()
    model.cast(torch.bfloat16)
    quantize_model(model, method, progress=False)
    assert plan(cfg, 1, quantization=method, dtype="bf16").weights == nbytes(model)


@pytest.mark.parametrize("dsa", [False, True])
def test_cache_per_token_equals_engine_cache(dsa):
    from dsv3.engine.runner import ModelRunner

    cfg = ModelConfig.from_dict({**TINY, **(DSA if dsa else {})})
    model = build_local_model(cfg, ParallelConfig(), torch.bfloat16, "cpu", with_mtp=True)
    for kv in ("auto", "int8"):
        runner = ModelRunner(model, num_blocks=2, block_size=16, kv_cache_dtype=kv)
        assert plan(cfg, 1, dtype="bf16", kv_cache_dtype=kv).cache_per_token == runner.cache.bytes_per_token()


def test_v3_671b_parameter_count():
    cfg = ModelConfig.from_dict(plan_cmd.V3_671B)
    p = plan(cfg, 1, dtype="bf16", with_mtp=False)
    assert abs(p.weights / 2 / 1e9 - 671.0) < 0.5  # the paper's 671B total parameters
    assert plan(cfg, 1, dtype="bf16").cache_per_token == 62 * 576 * 2  # 61 layers + MTP, 512 + 64 latent values in bf16
    with pytest.raises(ParallelError, match="num_attention_heads"):
        plan(cfg, 3)


def _run(argv: list[str]) -> int:
    parser = _Parser(prog="dsv3")
    plan_cmd.register(parser.add_subparsers(parser_class=_Parser))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_verdicts(capsys, tmp_path):
    common = ["plan", "--model", "deepseek-v3", "--max-model-len", "32768", "--max-num-seqs", "8"]
    assert _run(common + ["--quantization", "fp8", "--devices", "8", "--device-memory", "141"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("fits:")
    assert _run(common + ["--devices", "8", "--device-memory", "80"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("does not fit") and out[-1].endswith(": 32")  # bf16 1.34 TB needs 32 × 80 GiB
    ModelConfig.from_dict(TINY).save(tmp_path)
    assert _run(["plan", "--model", str(tmp_path / "config.json")]) == 0
    capsys.readouterr()
    ModelConfig.from_dict({**TINY, "quantization_config": {"quant_method": "dsv3", "format": "int8"}}).save(tmp_path)
    assert _run(["plan", "--model", str(tmp_path)]) == 0  # a dsv3-quantized checkpoint is planned in its format
    assert "weights int8" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="neither a checkpoint directory"):
        _run(["plan", "--model", str(tmp_path / "nope")])
