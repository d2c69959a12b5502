"""`dsv3 data instructions`: ast-mined chat pairs, their filters and phrasing, the split they come from,
and the default chat model's location."""

from __future__ import annotations

import ast
import json
import textwrap
from pathlib import Path

import pytest

from dsv3.cli import main
from dsv3.data.builder import build, split_of
from dsv3.data.instructions import (FunctionSite, describe, iter_functions, keep, mine, records, split_files,
                                    summary_of)
from dsv3.errors import DSV3Error

SOURCE = textwrap.dedent('''\
    import os


    def add(a, b=1):
        """Return the sum of a and b.

        Longer text that is not part of the summary.
        """
        total = a + b
        return total


    def nodoc(x):
        return x


    class Outer:
        """A class."""

        @staticmethod
        def scale(v: float, factor: float = 2.0) -> float:
            """HTTP-style scaling of v by a factor."""
            out = v * factor
            return out

        class Inner:
            def deep(self):
                """Compute something deep for the caller."""
                def helper():
                    """Nested functions are not mined."""
                    return 1
                return helper()


    def oneliner(x): "Docstring then code on one line."; return x
    ''')


def site(name: str, text: str = SOURCE) -> FunctionSite:
    return next(s for s in iter_functions(text, "pkg/mod.py") if s.qualname == name)


def test_iter_functions_finds_documented_functions_and_methods():
    sites = {s.qualname: s for s in iter_functions(SOURCE, "pkg/mod.py")}
    assert sorted(sites) == ["Outer.Inner.deep", "Outer.scale", "add"]  # no nodoc, helper, class, one-liner
    scale = sites["Outer.scale"]
    assert scale.head == ('@staticmethod\ndef scale(v: float, factor: float = 2.0) -> float:\n'
                          '    """HTTP-style scaling of v by a factor."""\n')
    assert scale.source == scale.head + "    out = v * factor\n    return out\n"
    assert scale.signature == "scale(v: float, factor: float = 2.0)"
    assert scale.body_lines == 2
    assert sites["add"].summary == "Return the sum of a and b"
    assert sites["Outer.Inner.deep"].body_lines == 4  # the nested helper is part of deep's body
    for s in sites.values():  # what the user types is itself valid Python, and the source extends it
        ast.parse(s.head)
        ast.parse(s.source)


def test_summary_and_instruction_phrasing():
    assert summary_of("Compute x.  Then more.\n\nDetails.") == "Compute x"
    assert summary_of("\n    Wrapped summary that\n    goes on.\n") == "Wrapped summary that goes on"
    text = describe(site("add"))
    assert text is not None and "`add(a, b=1)`" in text and text.endswith("that returns the sum of a and b.")
    scale = describe(site("Outer.scale"))  # not a verb: no "that", original capitalisation kept
    assert "HTTP-style scaling of v by a factor." in scale and " that " not in scale
    deep = describe(site("Outer.Inner.deep"))
    assert deep.endswith("that computes something deep for the caller.")
    bad = textwrap.dedent('''\
        def f(x):
            """Returns: the value."""
            y = x
            return y
        ''')
    assert describe(next(iter_functions(bad))) is None  # a section header, not a summary


def test_keep_filters_body_size_literals_and_fences():
    def one(body: str) -> FunctionSite:
        return next(iter_functions('def f(x):\n    """Do the thing to x."""\n' + textwrap.indent(body, "    ")))

    assert keep(one("y = x\nreturn y\n"))
    assert not keep(one("return x\n"))                                       # one body line
    assert not keep(one("".join(f"x{i} = {i}\n" for i in range(41))))        # 41 lines
    assert keep(one("".join(f"x{i} = {i}\n" for i in range(40))))
    assert not keep(one(f"y = {list(range(30))!r}\nreturn y\n"))            # a huge literal
    assert not keep(one(f"y = {'a' * 400!r}\nreturn y\n"))
    assert not keep(one('y = """```python\nx\n```"""\nreturn y\n'))        # would break the answer's fence


def test_records_train_on_the_fenced_function(tmp_path):
    from dsv3.lora.data import tokenize_record
    from dsv3.io.tokenizer import Tokenizer
    from tiny_tokenizer import make_tiny_tokenizer

    recs = records(site("add"))
    assert [r["meta"]["kind"] for r in recs] == ["describe", "complete"]
    # "write a function that <summary>" is answered with the docstring cut to that summary (an
    # oracle spelled out here); "complete this head" with the whole function
    brief_add = 'def add(a, b=1):\n    """Return the sum of a and b."""\n    total = a + b\n    return total\n'
    assert recs[0]["messages"][1]["content"] == "```python\n" + brief_add + "```"
    assert recs[1]["messages"][1]["content"] == "```python\n" + site("add").source + "```"
    scale = site("Outer.scale")  # a decorated method whose docstring is already the summary
    assert records(scale)[0]["messages"][1]["content"] == "```python\n" + scale.source + "```"
    assert site("add").head in recs[1]["messages"][0]["content"]
    tok = Tokenizer.from_dir(make_tiny_tokenizer(tmp_path / "tok"))
    ex = tokenize_record(tok, recs[0], "x", "chat", 4096)  # the form `dsv3 finetune` reads
    trained = tok.decode([i for i, m in zip(ex.ids, ex.mask) if m], skip_special_tokens=True)
    assert trained == recs[0]["messages"][1]["content"]
    assert recs[0]["messages"][0]["content"] not in trained


def _corpus(root: Path) -> tuple[list[str], list[str]]:
    """Files under root/src, named so that the 0.5 held-out hash puts two in each split."""
    held, train, i = [], [], 0
    while len(held) < 2 or len(train) < 2:
        rel = f"src/m{i}.py"
        (held if split_of(rel, 0.5) == "heldout" else train).append(rel)
        i += 1
    held, train = held[:2], train[:2]
    for k, rel in enumerate(held + train):
        body = "".join(f"    v{j} = x * {j + k}\n" for j in range(3))
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f'def work_{k}(x):\n    """Compute value number {k} from x."""\n{body}    return v2\n\n\n'
                                f'def dup(x):\n    """Return x doubled, a shared helper."""\n    y = x * 2\n    return y\n')
    return held, train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tiny_tokenizer import make_tiny_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    held, train = _corpus(root)
    tok = make_tiny_tokenizer(root / "tok")
    build([str(root / "src")], tok, root / "shards", include=["*.py"], heldout_fraction=0.5, near_dup_threshold=1.0,
          progress=False)
    return root, held, train


def test_split_files_follow_the_manifest(corpus):
    root, held, train = corpus
    got = split_files(root / "shards", "heldout", [str(root / "src")])
    assert [rel for rel, _ in got] == sorted(held)
    assert all(p == root / rel for rel, p in got)
    recs, stats = mine(split_files(root / "shards", "train", [str(root / "src")]))
    assert {r["meta"]["path"] for r in recs} == set(train)
    assert stats["duplicates"] == 1 and stats["kept"] == 3  # `dup` appears in both train files: kept once
    assert recs == mine(split_files(root / "shards", "train", [str(root / "src")]))[0]  # deterministic


def test_cli_writes_jsonl_and_reports_errors(corpus, tmp_path, capsys):
    root, held, _ = corpus
    out = tmp_path / "held.jsonl"
    assert main(["data", "instructions", "--inputs", str(root / "src"), "--shards", str(root / "shards"),
                 "-o", str(out), "--split", "heldout", "-q"]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert {r["meta"]["path"] for r in lines} == set(held)
    assert all(r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant" for r in lines)
    assert "write-a-function" in capsys.readouterr().out
    assert main(["data", "instructions", "--inputs", str(tmp_path / "nope"), "--shards", str(root / "shards"),
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err
    changed = tmp_path / "copy" / "src"
    changed.mkdir(parents=True)
    for rel in held:
        (changed / Path(rel).name).write_text((root / rel).read_text() + "# edited\n")
    assert main(["data", "instructions", "--inputs", str(changed), "--shards", str(root / "shards"),
                 "-o", str(out), "--split", "heldout"]) == 2
    assert "changed since the shards" in capsys.readouterr().err


def test_default_chat_model_choice(tmp_path, monkeypatch):
    import dsv3.io.paths as paths

    base, chat = tmp_path / "data" / "default", tmp_path / "data" / "default-chat"
    base.mkdir(parents=True)
    (base / "config.json").write_text("{}")
    monkeypatch.setattr(paths, "PACKAGE_DATA", tmp_path / "data")
    for var in ("DSV3_DEFAULT_MODEL", "DSV3_DEFAULT_CHAT_MODEL"):
        monkeypatch.delenv(var, raising=False)
    assert paths.default_model_dir(chat=True) == base  # no variant shipped: the base model chats
    chat.mkdir()
    (chat / "config.json").write_text("{}")
    assert paths.default_model_dir(chat=True) == chat
    assert paths.default_model_dir() == base
    monkeypatch.setenv("DSV3_DEFAULT_MODEL", str(tmp_path / "mine"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text("{}")
    assert paths.default_model_dir(chat=True) == tmp_path / "mine"  # the shipped variant belongs to the shipped base
    monkeypatch.setenv("DSV3_DEFAULT_CHAT_MODEL", str(chat))
    assert paths.default_model_dir(chat=True) == chat
    monkeypatch.setenv("DSV3_DEFAULT_CHAT_MODEL", str(tmp_path / "missing"))
    with pytest.raises(DSV3Error, match="DSV3_DEFAULT_CHAT_MODEL"):
        paths.default_model_dir(chat=True)
