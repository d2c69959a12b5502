"""Every `dsv3` sub-command, given a missing file, an unwritable output, an existing output and a bad flag,
answers with one `dsv3...: error:` line on stderr and exit status 2 — never a traceback, never after the work.

The walk calls the real dispatcher (`dsv3.cli.main`, what the `dsv3` script runs) in-process, since each
case fails before any model loads; a few cases also run `python -m dsv3` to show the same line, status and
absence of a traceback in a fresh process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3 import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace: a tiny model, an adapter for it, token shards, a file, a full directory, data files."""
    from dsv3.io.load import load_model
    from dsv3.data.builder import build
    from dsv3.lora import LoRASpec, inject_lora, save_adapter
    from tiny_model import make_tiny_model_dir

    root = tmp_path_factory.mktemp("cli_errors")
    model = make_tiny_model_dir(root / "model")
    m = load_model(model, dtype=torch.float32, progress=False)
    spec = LoRASpec(r=4, target_modules=["q_b_proj", "o_proj"])
    inject_lora(m, spec)
    save_adapter(m, root / "adapter", spec)
    src = root / "src"
    src.mkdir()
    (src / "a.py").write_text('def add(a, b):\n    """Add two numbers."""\n    total = a + b\n    return total\n')
    (src / "b.py").write_text('def mul(a, b):\n    """Multiply two numbers."""\n    product = a * b\n    return product\n')
    build([str(src)], model, root / "shards", heldout_fraction=0.0, progress=False)
    afile = root / "afile"
    afile.write_text("not a directory\n")
    full = root / "full"
    full.mkdir()
    (full / "old.txt").write_text("an earlier run's output\n")
    data = root / "train.jsonl"
    data.write_text('{"instruction": "say hi", "output": "hi"}\n')
    text = root / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 4)
    results = root / "results.json"
    results.write_text('{"task": "mmlu", "model": "m", "backend": "local", "primary": "acc", '
                       '"metrics": {"acc": {"value": 0.5, "stderr": 0.1, "n": 4}}}')
    return {"root": root, "model": model, "adapter": root / "adapter", "shards": root / "shards", "src": src,
            "afile": afile, "unwritable": afile / "out", "full": full, "data": data, "text": text,
            "missing": root / "missing", "results": results}


def run(argv, capsys) -> tuple[int, str]:
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    return rc, capsys.readouterr().err


def assert_one_line(rc: int, err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("dsv3") and ": error: " in lines[0], lines[0]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err


# (sub-command case, argv, the words the one line must contain); {x} names come from the workspace
CASES = [
    # generate / chat: a missing model or prompt file, a bad flag
    ("generate missing model", ["generate", "--model", "{missing}", "x"], "does not exist"),
    ("generate missing prompt file", ["generate", "--model", "{model}", "--prompt-file", "{missing}"], "prompt file"),
    ("generate missing adapter", ["generate", "--model", "{model}", "--lora", "{missing}", "x"], "adapter directory"),
    ("generate bad flag", ["generate", "--model", "{model}", "--max-tokens", "0", "x"], "positive integer"),
    ("generate bad rope scaling", ["generate", "--rope-scaling", "linear:factor=2", "x"], "only yarn"),
    ("generate bad spec acceptance", ["generate", "--model", "{model}", "--num-speculative-tokens", "1",
                                      "--spec-min-acceptance", "1.5", "x"], "between 0 and 1"),
    ("chat missing model", ["chat", "--model", "{missing}"], "does not exist"),
    ("chat bad flag", ["chat", "--temperature", "hot"], "invalid float value"),
    # serve: missing model, unwritable / directory outputs, bad flags
    ("serve missing model", ["serve", "--model", "{missing}"], "does not exist"),
    ("serve unwritable audit log", ["serve", "--model", "{model}", "--audit-log", "{unwritable}/a.jsonl"], "--audit-log"),
    ("serve audit log is a directory", ["serve", "--model", "{model}", "--audit-log", "{full}"], "existing directory"),
    ("serve bad flag: port out of range", ["serve", "--port", "99999"], "outside 0-65535"),
    ("serve abbreviated flag", ["serve", "--prot", "18308"], "unrecognized arguments: --prot"),
    ("audit verify missing log", ["audit", "verify", "{missing}"], "does not exist"),
    ("audit verify missing key", ["audit", "verify", "{afile}", "--key", "{missing}"], "key file"),
    ("audit verify bad flag", ["audit", "verify"], "the following arguments are required: path"),
    ("audit repair missing log", ["audit", "repair", "{missing}"], "does not exist"),
    ("audit repair bad flag", ["audit", "repair"], "the following arguments are required: path"),
    ("serve --quantization awq on full-precision files", ["serve", "--model", "{model}", "--quantization", "awq"],
     "dsv3 quantize --method awq"),
    ("serve audit key without log", ["serve", "--model", "{model}", "--audit-log-key", "{afile}"], "needs --audit-log"),
    ("serve bad trusted proxy", ["serve", "--model", "{model}", "--trusted-proxy", "10.0.0.0/33"], "--trusted-proxy"),
    ("serve bad grammar timeout", ["serve", "--model", "{model}", "--grammar-timeout", "0"], "--grammar-timeout"),
    # quantize
    ("quantize missing model", ["quantize", "--method", "int8", "--model", "{missing}", "-o", "{root}/q"], "does not exist"),
    ("quantize unwritable output", ["quantize", "--method", "int8", "--model", "{model}", "-o", "{unwritable}"],
     "cannot be created"),
    ("quantize output is a file", ["quantize", "--method", "int8", "--model", "{model}", "-o", "{afile}"], "existing file"),
    ("quantize existing output", ["quantize", "--method", "int8", "--model", "{model}", "-o", "{full}"], "--overwrite"),
    ("merge output is a file", ["merge", "--model", "{model}", "--adapter", "{adapter}", "-o", "{afile}"], "existing file"),
    ("quantize bad flag", ["quantize", "--method", "awq4", "--model", "{model}", "-o", "{root}/q"], "invalid choice"),
    # merge
    ("merge missing adapter", ["merge", "--model", "{model}", "--adapter", "{missing}", "-o", "{root}/m"], "does not exist"),
    ("merge unwritable output", ["merge", "--model", "{model}", "--adapter", "{adapter}", "-o", "{unwritable}"],
     "cannot be created"),
    ("merge existing output", ["merge", "--model", "{model}", "--adapter", "{adapter}", "-o", "{full}"], "--overwrite"),
    ("merge bad flag", ["merge", "--adapter", "{adapter}", "-o", "{root}/m", "--dtype"], "expected one argument"),
    # finetune
    ("finetune missing data", ["finetune", "--model", "{model}", "--data-files", "{missing}", "--output-dir", "{root}/f", "-q"],
     "does not exist"),
    ("finetune unwritable output", ["finetune", "--model", "{model}", "--data-files", "{data}", "--output-dir", "{unwritable}"],
     "cannot be created"),
    ("finetune existing output", ["finetune", "--model", "{model}", "--data-files", "{data}", "--output-dir", "{full}"],
     "--resume auto"),
    ("finetune output is a file", ["finetune", "--model", "{model}", "--data-files", "{data}", "--output-dir", "{afile}"],
     "existing file"),
    ("finetune bad flag", ["finetune", "--learning-rate", "fast"], "invalid float value"),
    # tokenizer train
    ("tokenizer missing files", ["tokenizer", "train", "--files", "{missing}/*.py", "--vocab-size", "300", "-o", "{root}/t"],
     "matches no files"),
    ("tokenizer unwritable output", ["tokenizer", "train", "--files", "{src}/*.py", "--vocab-size", "300", "-o", "{unwritable}"],
     "cannot be created"),
    ("tokenizer existing output", ["tokenizer", "train", "--files", "{src}/*.py", "--vocab-size", "300", "-o", "{full}"],
     "--overwrite"),
    ("tokenizer output is a file", ["tokenizer", "train", "--files", "{src}/*.py", "--vocab-size", "300", "-o", "{afile}"],
     "existing file"),
    ("tokenizer bad flag", ["tokenizer", "train", "--files", "{src}/*.py", "--vocab-size", "-3", "-o", "{root}/t"],
     "positive integer"),
    # data build / instructions / functions
    ("data build missing tokenizer", ["data", "build", "--inputs", "{src}", "--tokenizer", "{missing}", "-o", "{root}/d"],
     "tokenizer"),
    ("data build unwritable output", ["data", "build", "--inputs", "{src}", "--tokenizer", "{model}", "-o", "{unwritable}"],
     "cannot be created"),
    ("data build output is a file", ["data", "build", "--inputs", "{src}", "--tokenizer", "{model}", "-o", "{afile}"],
     "existing file"),
    ("data build bad flag", ["data", "build", "--inputs", "{src}", "--tokenizer", "{model}", "-o", "{root}/d",
                             "--heldout-fraction", "2"], "heldout-fraction"),
    ("data instructions missing shards", ["data", "instructions", "--shards", "{missing}", "-o", "{root}/i.jsonl"], "manifest"),
    ("data instructions unwritable output", ["data", "instructions", "--shards", "{shards}", "-o", "{unwritable}/i.jsonl"],
     "cannot be created"),
    ("data instructions output is a directory", ["data", "instructions", "--shards", "{shards}", "-o", "{full}"],
     "existing directory"),
    ("data instructions bad flag", ["data", "instructions", "--shards", "{shards}", "-o", "{root}/i.jsonl", "--split", "dev"],
     "invalid choice"),
    ("data functions missing shards", ["data", "functions", "--shards", "{missing}", "-o", "{root}/fn"], "manifest"),
    ("data functions existing output", ["data", "functions", "--shards", "{shards}", "-o", "{full}"], "--overwrite"),
    ("data functions unwritable output", ["data", "functions", "--shards", "{shards}", "-o", "{unwritable}"],
     "cannot be created"),
    ("data functions bad flag", ["data", "functions", "--shards", "{shards}", "-o", "{root}/fn", "--split", "test"],
     "invalid choice"),
    ("data packages missing shards", ["data", "packages", "--shards", "{missing}", "-o", "{root}/pk"], "manifest"),
    ("data packages existing output", ["data", "packages", "--shards", "{shards}", "-o", "{full}", "--min-chars", "10"],
     "--overwrite"),
    ("data packages unwritable output", ["data", "packages", "--shards", "{shards}", "-o", "{unwritable}"],
     "cannot be created"),
    ("data packages bad flag", ["data", "packages", "--shards", "{shards}", "-o", "{root}/pk", "--min-chars", "0"],
     "--min-chars"),
    ("data passkey missing inputs", ["data", "passkey", "--inputs", "{missing}", "-o", "{root}/pp"], "does not exist"),
    ("data passkey existing output", ["data", "passkey", "--inputs", "{src}", "-o", "{full}", "--min-chars", "10",
                                      "--max-chars", "50"], "--overwrite"),
    ("data passkey unwritable output", ["data", "passkey", "--inputs", "{src}", "-o", "{unwritable}", "--min-chars", "10",
                                        "--max-chars", "50"], "cannot be created"),
    ("data passkey bad flag", ["data", "passkey", "--inputs", "{src}", "-o", "{root}/pp", "--count", "0"], "--count"),
    ("data passkey too many needles", ["data", "passkey", "--inputs", "{src}", "-o", "{root}/pp", "--needles", "99"], "--needles must be 1 to 16"),
    # pretrain
    ("pretrain missing config", ["pretrain", "--config", "{missing}.yaml"], "does not exist"),
    ("pretrain unwritable out", ["pretrain", "--data", "{shards}", "--init-from", "{model}", "--out", "{unwritable}"],
     "cannot be created"),
    ("pretrain out is a file", ["pretrain", "--data", "{shards}", "--init-from", "{model}", "--out", "{afile}"], "existing file"),
    ("pretrain bad flag", ["pretrain", "--data", "{shards}", "--init-from", "{model}", "--max-steps", "many"], "max_steps"),
    # eval: every task checks its data and its --output before loading a model or calling a server
    ("eval perplexity missing data", ["eval", "perplexity", "--data", "{missing}"], "does not exist"),
    ("eval perplexity unwritable output", ["eval", "perplexity", "--data", "{text}", "-o", "{unwritable}/r.json"],
     "cannot be created"),
    ("eval perplexity output is a directory", ["eval", "perplexity", "--data", "{text}", "-o", "{full}"], "existing directory"),
    ("eval perplexity bad flag", ["eval", "perplexity", "--data", "{text}", "--window", "0"], "--window"),
    ("eval mmlu missing data", ["eval", "mmlu", "--data", "{missing}"], "does not exist"),
    ("eval mmlu unwritable output", ["eval", "mmlu", "--data", "{root}", "-o", "{unwritable}/r.json"], "cannot be created"),
    ("eval mmlu output is a directory", ["eval", "mmlu", "--data", "{root}", "-o", "{full}"], "existing directory"),
    ("eval mmlu bad flag", ["eval", "mmlu", "--data", "{root}", "--num-fewshot", "-1"], "--num-fewshot"),
    ("eval gsm8k missing data", ["eval", "gsm8k", "--data", "{missing}"], "does not exist"),
    ("eval gsm8k unwritable output", ["eval", "gsm8k", "--data", "{data}", "-o", "{unwritable}/r.json"], "cannot be created"),
    ("eval gsm8k output is a directory", ["eval", "gsm8k", "--data", "{data}", "-o", "{full}"], "existing directory"),
    ("eval gsm8k bad flag", ["eval", "gsm8k", "--data", "{data}", "--max-tokens", "0"], "--max-tokens"),
    ("eval humaneval missing data", ["eval", "humaneval", "--data", "{missing}"], "does not exist"),
    ("eval humaneval unwritable output", ["eval", "humaneval", "-o", "{unwritable}/r.json"], "cannot be created"),
    ("eval humaneval output is a directory", ["eval", "humaneval", "-o", "{full}"], "existing directory"),
    ("eval humaneval bad flag", ["eval", "humaneval", "--n", "2", "--k", "5"], "--k 5 needs --n"),
    ("eval extraction missing data", ["eval", "extraction", "--data", "{missing}"], "does not exist"),
    ("eval extraction unwritable output", ["eval", "extraction", "-o", "{unwritable}/r.json"], "cannot be created"),
    ("eval extraction output is a directory", ["eval", "extraction", "-o", "{full}"], "existing directory"),
    ("eval extraction bad flag", ["eval", "extraction", "--max-tokens", "0"], "--max-tokens"),
    ("eval needle unwritable output", ["eval", "needle", "-o", "{unwritable}/r.json"], "cannot be created"),
    ("eval needle missing haystack", ["eval", "needle", "--haystack", "{missing}"], "does not exist"),
    ("eval needle output is a directory", ["eval", "needle", "-o", "{full}"], "existing directory"),
    ("eval needle bad flag", ["eval", "needle", "--depths", "0,1.5"], "--depths"),
    ("eval long-ppl missing data", ["eval", "long-ppl", "--data", "{missing}"], "does not exist"),
    ("eval long-ppl unwritable output", ["eval", "long-ppl", "--data", "{text}", "-o", "{unwritable}/r.json"],
     "cannot be created"),
    ("eval long-ppl output is a directory", ["eval", "long-ppl", "--data", "{text}", "-o", "{full}"], "existing directory"),
    ("eval long-ppl bad flag", ["eval", "long-ppl", "--data", "{text}", "--contexts", "a,b"], "--contexts"),
    ("eval compare missing results", ["eval", "compare", "{missing}.json", "-o", "{root}/c.png"], "cannot be read"),
    ("eval compare unwritable output", ["eval", "compare", "{results}", "-o", "{unwritable}/c.png"], "cannot be created"),
    ("eval compare output is a directory", ["eval", "compare", "{results}", "-o", "{full}"], "existing directory"),
    ("eval compare bad flag", ["eval", "compare", "{results}", "{results}", "-o", "{root}/c.png", "--labels", "a"],
     "--labels has 1 names"),
    # export
    ("export gguf missing model", ["export", "gguf", "--model", "{missing}", "-o", "{root}/m.gguf"], "does not exist"),
    ("export gguf unwritable output", ["export", "gguf", "--model", "{model}", "-o", "{unwritable}/m.gguf"],
     "cannot be created"),
    ("export gguf output is a directory", ["export", "gguf", "--model", "{model}", "-o", "{full}"],
     "existing directory"),
    ("export gguf bad flag", ["export", "gguf", "--model", "{model}", "-o", "{root}/m.gguf", "--type", "q4_k"],
     "invalid choice"),
    # plan
    ("plan missing model", ["plan", "--model", "{missing}"], "neither a checkpoint"),
    ("plan bad flag", ["plan", "--model", "deepseek-v3", "--devices", "0"], "positive integer"),
]


@pytest.mark.parametrize("name, argv, needle", CASES, ids=[c[0] for c in CASES])
def test_one_line_error(ws, capsys, name, argv, needle):
    argv = [a.format(**ws) for a in argv]
    before = sorted(p.name for p in ws["root"].iterdir())
    rc, err = run(argv, capsys)
    assert_one_line(rc, err, needle)
    assert sorted(p.name for p in ws["root"].iterdir()) == before  # a failed command creates no output directory
    if "existing" in name or "unwritable" in name or "is a file" in name:
        assert (ws["full"] / "old.txt").read_text() == "an earlier run's output\n"  # nothing was written over
        assert sorted(p.name for p in ws["full"].iterdir()) == ["old.txt"]


def test_every_sub_command_is_walked():
    """Each leaf sub-command of `dsv3 --help` has a missing-input and a bad-flag case in CASES, and one with an output
    argument an unwritable-output and an existing-output (or output-is-a-file/directory) case."""
    parser = cli.build_parser()
    leaves = []

    def walk(p, prefix):
        subs = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subs:
            leaves.append((" ".join(prefix), p))
        for s in subs:
            for name, child in s.choices.items():
                walk(child, prefix + [name])

    walk(parser, [])
    outputs = ("-o", "--output", "--out", "--output-dir", "--audit-log")
    for leaf, p in leaves:
        names = [c[0] for c in CASES if " ".join(a for a in c[1] if not a.startswith("-") and "{" not in a).startswith(leaf)]
        kinds = ["missing", "bad flag"]
        if any(o in outputs for a in p._actions for o in a.option_strings):
            kinds += ["unwritable", ("existing", "is a")]
        for kind in kinds:
            assert any(k in n for n in names for k in ((kind,) if isinstance(kind, str) else kind)), \
                f"no {kind} case for `dsv3 {leaf}`"


def test_quantize_refuses_an_already_quantized_checkpoint(ws, tmp_path, capsys):
    out = tmp_path / "q8"
    rc, err = run(["quantize", "--method", "int8", "--model", ws["model"], "-o", out], capsys)
    assert rc == 0, err
    rc, err = run(["quantize", "--method", "int4", "--model", out, "-o", tmp_path / "q4"], capsys)
    assert_one_line(rc, err, "already quantized (int8")
    assert not (tmp_path / "q4").exists()


def test_overwrite_replaces_an_existing_output(ws, tmp_path, capsys):
    from dsv3.config import ModelConfig

    out = tmp_path / "q"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
    (out / "model.safetensors.index.json").write_text('{"weight_map": {"x": "model-00001-of-00002.safetensors"}}')
    rc, err = run(["quantize", "--method", "int8", "--model", ws["model"], "-o", out, "--overwrite"], capsys)
    assert rc == 0, err
    assert not (out / "model.safetensors.index.json").exists() and not (out / "model-00001-of-00002.safetensors").exists()
    assert ModelConfig.from_dir(out).quantization_config["format"] == "int8"
    rc, err = run(["generate", "--model", out, "--max-tokens", "2", "def"], capsys)
    assert rc == 0, err


def test_real_entry_point_prints_one_line_and_no_traceback(ws):
    """The same checks in a fresh `python -m dsv3` process: stderr, exit status, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for argv, needle in [
        (["quantize", "--method", "int8", "--model", ws["model"], "-o", ws["unwritable"]], "cannot be created"),
        (["eval", "perplexity", "--data", ws["text"], "-o", ws["unwritable"] / "r.json"], "cannot be created"),
        (["serve", "--port", "99999"], "outside 0-65535"),
    ]:
        r = subprocess.run([sys.executable, "-m", "dsv3", *map(str, argv)], capture_output=True, text=True, env=env,
                           timeout=120)
        assert_one_line(r.returncode, r.stderr, needle)
