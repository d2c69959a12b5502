"""Context length: the trained/declared limit, one warning past it, and `--rope-scaling` (YaRN) from the command line."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from dsv3 import cli
from dsv3.config import ModelConfig
from dsv3.models.context_length import (context_limit, parse_rope_scaling, rope_scaled_config, with_max_position,
                                         with_rope_scaling)
from dsv3.errors import ConfigError

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    """A tiny model without rope scaling that records it was trained on 16-token sequences."""
    from tiny_model import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("ctx"), rope_scaling=None, max_position_embeddings=256,
                               training_seq_len=16)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    import dsv3.models.context_length

    monkeypatch.setattr(dsv3.models.context_length, "_warned", set())


def cfg(**kw) -> ModelConfig:
    from tiny_model import TINY

    return ModelConfig.from_dict({**TINY, "vocab_size": 100, "rope_scaling": None, **kw})


def test_limit_prefers_training_length_then_yarn_then_declared():
    assert context_limit(cfg(max_position_embeddings=4096))[0] == 4096
    n, why = context_limit(cfg(max_position_embeddings=4096, training_seq_len=512))
    assert n == 512 and "trained on 512-token sequences" in why and "4,096" in why
    assert context_limit(cfg(max_position_embeddings=1024, rope_scaling=YARN))[0] == 256  # 64 original x 4
    n, why = context_limit(cfg(max_position_embeddings=1024, rope_scaling=YARN, training_seq_len=32))
    assert n == 128 and "32 trained positions" in why  # YaRN stretches what was trained, not what was declared
    assert context_limit(cfg(max_position_embeddings=4096, training_seq_len=8192))[0] == 4096


def test_embedded_model_records_its_trained_length_and_its_card_says_so():
    import yaml

    from dsv3.io.paths import PACKAGE_DATA, default_model_dir

    for chat in (False, True):
        c = ModelConfig.from_dir(default_model_dir(chat=chat))
        assert c.extra["training_seq_len"] == 512 and context_limit(c)[0] == 512
    trained = yaml.safe_load((PACKAGE_DATA / "default" / "pretrain.yaml").read_text())["seq_len"]
    assert trained == 512 == yaml.safe_load((PACKAGE_DATA / "default" / "anneal.yaml").read_text())["seq_len"]
    card = (PACKAGE_DATA / "default" / "README.md").read_text()
    assert "## Context length" in card and "512-token" in card and "training_seq_len" in card


def test_generate_warns_once_past_the_trained_length(plain_dir, capsys):
    rc = cli.main(["generate", "--model", str(plain_dir), "--max-model-len", "200", "--max-tokens", "2",
                   "def f(x):\n    return x + 1\n" * 4])
    err = capsys.readouterr().err
    assert rc == 0, err
    lines = err.splitlines()
    assert lines[0].startswith("dsv3: warning: max_model_len 200 is past the 16 tokens this model handles well")
    assert lines[1].startswith("dsv3: warning: a prompt of ") and "past the 16 tokens" in lines[1]
    assert len(lines) == 2


def test_no_warning_within_the_limit(plain_dir, capsys):
    assert cli.main(["generate", "--model", str(plain_dir), "--max-tokens", "2", "def"]) == 0
    assert capsys.readouterr().err == ""


def test_engine_warns_once_per_process_not_per_request(plain_dir, caplog):
    from dsv3 import LLM, SamplingParams

    llm = LLM(plain_dir, dtype="fp32")  # max_model_len: the declared 256, so no max_model_len warning
    long = ["x = 1\n" * 10, "y = 2\n" * 15, "z = 3\n" * 20]
    with caplog.at_level(logging.WARNING, logger="dsv3.models.context_length"):
        llm.generate(long, SamplingParams(max_tokens=2), use_tqdm=False)
        llm.generate(long[:1], SamplingParams(max_tokens=2), use_tqdm=False)
    warnings = [r for r in caplog.records if r.name == "dsv3.models.context_length"]
    assert len(warnings) == 1 and "a prompt of" in warnings[0].getMessage()


def test_rope_scaling_flag_forms():
    compact = parse_rope_scaling("yarn:factor=4,original_max_position_embeddings=4096")
    vllm = parse_rope_scaling('{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}')
    assert compact == vllm == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    assert parse_rope_scaling("yarn:factor=2.5,beta_fast=16")["beta_fast"] == 16.0
    for bad, words in [("linear:factor=2", "only yarn"), ("yarn:factor=4,scale=2", "unknown"), ("yarn:", "needs factor"),
                       ("{not json", "not valid JSON"), ("yarn:factor=x", "must be a float"),
                       ("yarn:factor=4,original_max_position_embeddings=40.5", "must be a int")]:
        with pytest.raises(ConfigError, match=words):
            parse_rope_scaling(bad)
    with pytest.raises(ConfigError, match="factor"):  # a factor below 1 is refused by the config parser, naming it
        rope_scaled_config({**_raw(), "max_position_embeddings": 256}, {"type": "yarn", "factor": 0.5})


def _raw():
    from tiny_model import TINY

    return {**TINY, "vocab_size": 100}


def test_max_position_overlay_admits_more_positions_and_leaves_the_model_alone(plain_dir):
    """with_max_position (what the long-model bench uses to time a 1M context) changes the position limit only."""
    from dsv3.io.load import load_model

    before = json.loads((plain_dir / "config.json").read_text())
    overlay = with_max_position(plain_dir, 4096)
    after = json.loads((overlay / "config.json").read_text())
    assert after.pop("max_position_embeddings") == 4096 and before.pop("max_position_embeddings") < 4096
    assert after == before  # rotary, YaRN and every other key unchanged
    ids = torch.tensor([list(range(5, 105))])
    with torch.no_grad():
        assert torch.equal(load_model(overlay, dtype="fp32", progress=False)(ids),
                           load_model(plain_dir, dtype="fp32", progress=False)(ids))
    shorter = json.loads((with_max_position(plain_dir, 8) / "config.json").read_text())
    assert shorter["max_position_embeddings"] == json.loads((plain_dir / "config.json").read_text())["max_position_embeddings"]


def test_rope_scaling_overlay_equals_an_edited_config(plain_dir, tmp_path, capsys):
    """--rope-scaling gives exactly the model of a checkpoint whose config.json was edited by hand."""
    from dsv3.io.load import load_model

    edited = tmp_path / "edited"
    shutil.copytree(plain_dir, edited)
    raw = json.loads((edited / "config.json").read_text())
    raw.update(rope_scaling=YARN, max_position_embeddings=256)
    (edited / "config.json").write_text(json.dumps(raw))
    overlay = with_rope_scaling(plain_dir, parse_rope_scaling("yarn:factor=4,original_max_position_embeddings=64"))
    assert overlay.name == plain_dir.name and json.loads((plain_dir / "config.json").read_text())["rope_scaling"] is None
    ids = torch.tensor([list(range(5, 105))])
    with torch.no_grad():
        base = load_model(plain_dir, dtype="fp32", progress=False)(ids)
        want = load_model(edited, dtype="fp32", progress=False)(ids)
        got = load_model(overlay, dtype="fp32", progress=False)(ids)
    assert torch.equal(got, want) and (got - base).abs().max() > 1e-3  # it changes the model, as the edit does
    outs = []
    for argv in (["--model", str(plain_dir), "--rope-scaling", "yarn:factor=4,original_max_position_embeddings=64"],
                 ["--model", str(edited)]):
        assert cli.main(["generate", *argv, "--max-tokens", "12", "--dtype", "fp32", "def f(x):"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]
