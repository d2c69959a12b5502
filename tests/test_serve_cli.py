"""`dsv3 serve` / `dsv3 audit verify` flags: bad values fail fast with one-line DSV3Errors, before any model load."""

from __future__ import annotations

import hashlib

import pytest

from dsv3.cli import _Parser
from dsv3.commands.serve import build_config, register
from dsv3.errors import DSV3Error


def parse(*argv: str):
    p = _Parser(prog="dsv3")
    register(p.add_subparsers(parser_class=_Parser))
    return p.parse_args(list(argv))


def test_flags_build_a_config(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("ops:" + hashlib.sha256(b"k").hexdigest() + "\n")
    args = parse("serve", "--model", str(tmp_path), "--api-key", "a", "--api-key-file", str(keys), "--rate-limit", "30,5000",
                 "--response-cache", str(tmp_path / "c.sqlite"), "--audit-log", str(tmp_path / "a.jsonl"), "--max-queue", "3")
    cfg = build_config(args)
    assert cfg.keys.check("Bearer k") == "ops" and cfg.keys.check("Bearer a")
    assert cfg.rate_limiter.limit.requests_per_minute == 30 and cfg.rate_limiter.limit.tokens_per_minute == 5000
    assert cfg.max_queue == 3 and cfg.served_model_name == tmp_path.name and cfg.audit is not None
    assert (cfg.embedding_pooling, cfg.responses_max_entries, cfg.responses_max_bytes) == ("mean", 1000, 64 << 20)
    cfg.audit.close()
    cfg.cache.close()
    cfg = build_config(parse("serve", "--model", str(tmp_path), "--embedding-pooling", "last", "--responses-max-entries",
                             "5", "--responses-max-mib", "2"))
    assert (cfg.embedding_pooling, cfg.responses_max_entries, cfg.responses_max_bytes) == ("last", 5, 2 << 20)


@pytest.mark.parametrize("flags, culprit", [
    (["--rate-limit", "fast"], "--rate-limit"),
    (["--tls-certfile", "c.pem"], "--tls-keyfile"),
    (["--api-key-file", "/nonexistent/keys"], "API-key file"),
    (["--tensor-parallel-size", "2", "--quantization", "int8"], "--quantization"),
    (["--lora", "a=b"], "--lora"),
])
def test_bad_flags_raise_one_line_errors(tmp_path, flags, culprit):
    with pytest.raises(DSV3Error, match=culprit) as e:
        build_config(parse("serve", "--model", str(tmp_path), *flags))
    assert "\n" not in str(e.value)


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        parse("serve", "--port", "eighty")
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        parse("audit")


def test_quantization_flag_quantizes_at_load(tmp_path):
    from dsv3.commands.serve import loader
    from dsv3.quant.linear import QuantLinear
    from dsv3.engine.sampling import SamplingParams
    from tiny_model import make_tiny_model_dir

    d = make_tiny_model_dir(tmp_path / "m")
    args = parse("serve", "--model", str(d), "--quantization", "int8", "--max-model-len", "64", "--kv-cache-memory", "8")
    engine, tok = loader(args)()
    assert any(isinstance(m, QuantLinear) for m in engine.model.modules())
    assert engine.model.config.quantization_config["format"] == "int8"
    out = engine.generate(["def f"], SamplingParams(max_tokens=3, temperature=0))[0].outputs[0]
    assert len(out.token_ids) >= 1
    assert parse("serve", "--quantization", "awq").quantization == "awq"  # vLLM's spelling: checked against the files
    with pytest.raises(SystemExit):
        parse("serve", "--quantization", "int3")
