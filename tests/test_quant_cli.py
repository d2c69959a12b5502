"""`dsv3 quantize` end to end through the real CLI dispatcher (error handling, exit codes)."""

import json

import pytest
import torch

import dsv3.cli as cli
from dsv3.quant import load_quantized
from dsv3.quant.linear import QuantLinear
from tiny_model import make_tiny_model_dir


@pytest.fixture(autouse=True)
def with_quantize_command(monkeypatch):
    """Until the lead adds it to COMMAND_MODULES, register the sub-command for these tests."""
    if "dsv3.commands.quantize" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", cli.COMMAND_MODULES + ("dsv3.commands.quantize",))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("qcli"))


def test_quantize_awq_writes_a_loadable_checkpoint(model_dir, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n" * 20)
    out = tmp_path / "awq"
    rc = cli.main(["quantize", "--method", "awq", "--model", str(model_dir), "-o", str(out), "--calib", str(calib),
                   "--group-size", "32", "--calib-samples", "2", "--calib-seq-len", "32"])
    assert rc == 0
    assert "awq: linear weights" in capsys.readouterr().err
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "dsv3" and qc["format"] == "int4" and qc["calibration"] == "awq" and qc["group_size"] == 32
    assert (out / "tokenizer.json").is_file()
    model = load_quantized(out, progress=False)
    assert isinstance(model.model.layers[0].self_attn.kv_b_proj, QuantLinear)
    assert torch.isfinite(model(torch.tensor([[5, 6, 7]]))).all()


@pytest.mark.parametrize("argv,needle", [
    (["--method", "int3"], "invalid choice: 'int3'"),
    (["--method", "int4", "--group-size", "100"], "group size 100"),
    (["--method", "awq"], "--calib FILE"),
    (["--method", "awq", "--calib", "/nonexistent/calib.txt"], "calibration file"),
])
def test_bad_input_exits_2_with_one_line(model_dir, tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) if "int3" in argv else _no_raise():
        rc = cli.main(["quantize", "--model", str(model_dir), "-o", str(tmp_path / "o"), *argv])
        assert rc == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_argparse_exit_code_is_2(model_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "--method", "int3", "--model", str(model_dir), "-o", str(tmp_path / "o")])
    assert e.value.code == 2


def test_lm_head_format_option(model_dir, tmp_path, capsys):
    out = tmp_path / "int4-head8"
    assert cli.main(["quantize", "--method", "int4", "--group-size", "32", "--lm-head", "int8", "--model", str(model_dir),
                     "-o", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["lm_head"] == "int8"
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "--method", "int4", "--lm-head", "int5", "--model", str(model_dir), "-o", str(tmp_path / "x")])
    assert e.value.code == 2 and "invalid choice: 'int5'" in capsys.readouterr().err


def test_generate_loads_the_quantized_output(model_dir, tmp_path, capsys):
    """`dsv3 generate --model OUT` on a `dsv3 quantize` checkpoint loads the packed modules (load_model
    dispatches to load_quantized) and prints what the quantized model generates in-process."""
    from dsv3 import LLM, SamplingParams
    from dsv3.quant.linear import QuantLinear

    out = tmp_path / "int8"
    assert cli.main(["quantize", "--method", "int8", "--model", str(model_dir), "-o", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(out), "--max-tokens", "8", "def f(x):"]) == 0
    printed = capsys.readouterr().out
    llm = LLM(out)
    assert any(isinstance(m, QuantLinear) for m in llm.model.modules())
    assert printed == llm.generate("def f(x):", SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].text + "\n"
