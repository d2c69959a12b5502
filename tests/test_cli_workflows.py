"""Command-line workflows as a newcomer runs them: long prompts from a file or stdin, an adapter on the
command line, a conversation that outgrows the context, a server whose model cannot load, a chosen
rendezvous port, and `torchrun ... dsv3 serve` without --model."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from dsv3 import LLM, SamplingParams, cli
from dsv3.commands.run import fit_conversation
from tiny_model import make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("wf"))


@pytest.fixture(scope="module")
def adapter(model_dir, tmp_path_factory):
    from dsv3.io.load import load_model
    from dsv3.lora import LoRASpec, inject_lora, save_adapter

    m = load_model(model_dir, dtype=torch.float32, progress=False)
    spec = LoRASpec(r=4, target_modules=["q_b_proj", "kv_b_proj", "o_proj"])
    inject_lora(m, spec)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:  # a trained adapter's B is not zero; a zero B would change nothing
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return save_adapter(m, tmp_path_factory.mktemp("ad") / "adapter", spec)


def generate(argv, capsys, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = cli.main(["generate", *map(str, argv)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


PROMPT = "def add(a, b):\n    return"


def test_prompt_from_file_and_stdin_equals_the_argument(model_dir, tmp_path, capsys, monkeypatch):
    flags = ["--model", model_dir, "--max-tokens", "8", "--dtype", "fp32"]
    rc, want, err = generate([*flags, PROMPT], capsys)
    assert rc == 0, err
    (tmp_path / "p.txt").write_text(PROMPT)
    assert generate([*flags, "--prompt-file", tmp_path / "p.txt"], capsys)[:2] == (0, want)
    assert generate(flags, capsys, stdin=PROMPT, monkeypatch=monkeypatch)[:2] == (0, want)  # piped, no prompt
    assert generate([*flags, "-"], capsys, stdin=PROMPT, monkeypatch=monkeypatch)[:2] == (0, want)
    assert generate([*flags, "--prompt-file", "-"], capsys, stdin=PROMPT, monkeypatch=monkeypatch)[:2] == (0, want)
    rc, _, err = generate([*flags, "--prompt-file", tmp_path / "p.txt", PROMPT], capsys)
    assert rc == 2 and err.startswith("dsv3: error: give the prompt as an argument or with --prompt-file, not both")
    rc, _, err = generate(flags, capsys, stdin="", monkeypatch=monkeypatch)
    assert rc == 2 and err == "dsv3: error: the prompt is empty\n"


def test_generate_with_lora_equals_the_python_api(model_dir, adapter, capsys):
    params = SamplingParams(max_tokens=10, temperature=0)
    llm = LLM(model_dir, dtype="fp32", lora_adapters={"a": str(adapter)})
    want = llm.generate([PROMPT], params, use_tqdm=False, lora="a")[0].outputs[0].text
    base = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].text
    assert want != base  # the adapter changes the output
    rc, out, err = generate(["--model", model_dir, "--lora", adapter, "--max-tokens", "10", "--dtype", "fp32", PROMPT], capsys)
    assert rc == 0, err
    assert out == want + "\n"


class FakeTokens:
    """A stand-in LLM whose chat prompt is one token per character: the arithmetic is checkable by hand."""

    def __init__(self, max_model_len: int):
        self.engine = type("E", (), {"max_model_len": max_model_len})()

    def chat_prompt_ids(self, messages):
        return [0] * sum(len(m["content"]) + 2 for m in messages)


def test_fit_conversation_drops_oldest_exchanges_keeps_system_and_newest():
    system = [{"role": "system", "content": "s" * 8}]  # 10 tokens
    history = []
    for i in range(4):
        history += [{"role": "user", "content": f"u{i}" + "x" * 8}, {"role": "assistant", "content": f"a{i}" + "y" * 8}]
    history.append({"role": "user", "content": "u4" + "x" * 8})  # 9 messages of 12 tokens
    ids, dropped = fit_conversation(FakeTokens(100), system, history, max_tokens=30)
    # 10 + 12 k + 30 <= 100 -> k <= 5: drop the two oldest exchanges (4 messages), keeping 5
    assert dropped == 4 and len(ids) == 10 + 5 * 12
    assert [m["content"][:2] for m in history] == ["u2", "a2", "u3", "a3", "u4"]
    ids, dropped = fit_conversation(FakeTokens(100), system, history, max_tokens=1000)  # room capped at half the context
    assert dropped == 2 and len(ids) == 10 + 3 * 12 <= 50
    lone = [{"role": "user", "content": "z" * 500}]
    ids, dropped = fit_conversation(FakeTokens(100), system, lone, max_tokens=30)
    assert dropped == 0 and lone and len(ids) > 100  # the newest message is never dropped; the caller refuses it


def test_chat_keeps_going_past_the_context(model_dir, capsys, monkeypatch):
    turns = [f"please write function number {i} that adds two numbers" for i in range(8)]
    turns.insert(4, "word " * 300)  # alone longer than the context: refused, the session goes on
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(turns) + "\n/exit\n"))
    prompts = []
    stream = LLM.stream

    def spy(self, prompt, params=None, lora=None):
        prompts.append(prompt["prompt_token_ids"])
        yield from stream(self, prompt, params, lora)

    monkeypatch.setattr(LLM, "stream", spy)
    rc = cli.main(["chat", "--model", str(model_dir), "--max-model-len", "128", "--max-tokens", "16", "--dtype", "fp32",
                   "--system", "You write Python."])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    err = cap.err.splitlines()
    assert any(line.startswith("(dropped the ") and "oldest message" in line and "128-token context" in line for line in err)
    refused = [line for line in err if line.startswith("dsv3: error:")]
    assert len(refused) == 1 and "more than max_model_len 128; it was not sent" in refused[0]
    assert "Traceback" not in cap.err
    assert len(prompts) == 8  # every short turn was answered
    assert all(len(p) + 16 <= 128 for p in prompts)  # each prompt left room for a full reply
    assert min(len(p) for p in prompts[1:]) > len(prompts[0])  # every later turn, the refused one's next included,
    # still carries earlier turns: the refusal did not clear the history, and dropping kept recent turns


def test_serve_stops_at_once_when_the_model_cannot_load(model_dir, tmp_path):
    """No config.json: one line before the server starts. Weights that cannot be read: the server stops itself."""
    empty = tmp_path / "notmodel"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model_dir.iterdir():
        if f.suffix == ".json":
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      truncated")
    for model, last in [(empty, "dsv3: error: no config.json in"), (broken, "dsv3: error: the model failed to load: ")]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "dsv3", "serve", "--model", str(model), "--port", str(port)],
                           capture_output=True, text=True, env=ENV, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, r.stderr
        assert lines[-1].startswith(last), r.stderr
        assert "Traceback" not in r.stderr
        if model is empty:
            assert len(lines) == 1


def test_serve_refuses_a_taken_port_in_one_line(model_dir, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc = cli.main(["serve", "--model", str(model_dir), "--port", str(port)])
        err = capsys.readouterr().err
    assert rc == 2 and err == f"dsv3: error: --port {port}: cannot bind 127.0.0.1:{port} (Address already in use)\n"


def test_retry_load_keeps_trying_until_the_model_appears(model_dir, tmp_path, capsys):
    from test_serve_cli import parse

    from dsv3.commands.serve import loader

    later = tmp_path / "later"
    later.mkdir()
    args = parse("serve", "--model", str(later), "--retry-load", "0.05", "--max-model-len", "64", "--kv-cache-memory", "8")
    stop, result = threading.Event(), {}
    thread = threading.Thread(target=lambda: result.update(out=loader(args, stop=stop)()), daemon=True)
    thread.start()
    thread.join(0.3)
    assert thread.is_alive()  # still retrying: the directory holds no model yet
    for f in model_dir.iterdir():
        (later / f.name).write_bytes(f.read_bytes())
    thread.join(60)
    engine, tok = result["out"]
    assert engine.generate(["def f"], SamplingParams(max_tokens=2, temperature=0))[0].outputs[0].token_ids
    args = parse("serve", "--model", str(tmp_path), "--retry-load", "0.05")  # stop ends the retries
    stop.set()
    with pytest.raises(Exception, match="config.json"):
        loader(args, stop=stop)()


def test_master_port_in_use_is_one_line(model_dir, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc = cli.main(["generate", "--model", str(model_dir), "--tensor-parallel-size", "2", "--master-port", str(port), "x"])
        err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"dsv3: error: --master-port {port}: cannot bind 127.0.0.1:{port}")


def test_torchrun_worker_rank_without_model_serves_the_default_model(monkeypatch):
    """`torchrun ... dsv3 serve` without --model: the worker ranks load the embedded model, as rank 0 does."""
    import dsv3.commands.serve as serve_cmd
    from test_serve_cli import parse

    from dsv3.io.paths import default_model_dir

    seen = {}
    monkeypatch.setattr(serve_cmd, "start_parallel", lambda args, model, cfg: seen.update(model=model))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert serve_cmd.run_serve(parse("serve", "--tensor-parallel-size", "2")) == 0
    assert Path(seen["model"]) == default_model_dir()
