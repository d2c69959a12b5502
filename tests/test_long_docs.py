"""Long-context corpora: package documents in import order, passkey documents, and their `dsv3 data` commands."""

from __future__ import annotations

import random
import re

import pytest

from dsv3.data.long_docs import NAMES, import_order, package_documents, passkey_document, passkey_documents


def test_a_module_follows_the_siblings_it_imports():
    texts = {
        "__init__": "from .api import run\nfrom . import util\n",
        "api": "from .core import Engine\nimport util\n",
        "core": "from pkg.util import helper\nfrom pkg import consts\n",
        "util": "import os\n",
        "consts": "X = 1\n",
        "loop_a": "from . import loop_b\n",
        "loop_b": "from . import loop_a\n",
    }
    order = import_order(texts, "pkg")
    assert sorted(order) == sorted(texts)
    for mod, deps in {"api": ["core", "util"], "core": ["util", "consts"], "__init__": ["api", "util"]}.items():
        assert all(order.index(d) < order.index(mod) for d in deps), (mod, order)
    assert order.index("loop_a") < order.index("loop_b")  # a cycle is broken by name


def test_package_documents_group_order_and_cut(tmp_path):
    pkg, other = tmp_path / "pkg", tmp_path / "small"
    pkg.mkdir()
    other.mkdir()
    (pkg / "b.py").write_text("from .a import f\n" + "x = 1\n" * 2000)
    (pkg / "a.py").write_text("def f():\n    return 1\n" + "# pad\n" * 2000)
    (other / "c.py").write_text("y = 2\n")
    files = [(f"{p.parent.name}/{p.name}", p) for p in sorted(tmp_path.glob("*/*.py"))]
    docs = dict(package_documents(files, min_chars=1000))
    assert list(docs) == ["pkg#0"]  # the small directory is left out
    text = docs["pkg#0"]
    assert text.index("# file: pkg/a.py") < text.index("# file: pkg/b.py")
    cut = list(package_documents(files, min_chars=1000, max_chars=13_000))
    assert [n for n, _ in cut] == ["pkg#0", "pkg#1"] and cut[0][1].startswith("# file: pkg/a.py")


def test_passkey_documents_hide_a_key_and_ask_for_it():
    text = "".join(f"line_{i} = {i}\n" for i in range(5000))
    docs = list(passkey_documents([text], 50, 2000, 8000, seed=3))
    assert docs == list(passkey_documents([text], 50, 2000, 8000, seed=3))
    depths = []
    for doc in docs:
        m = re.search(r'\nassert (\w+) == "(\d{5})"\n$', doc)
        assert m and m.group(1) in NAMES and m.group(1) != "PASSKEY"
        lines = doc.split("\n")
        at = [i for i, line in enumerate(lines) if line.startswith(f'{m.group(1)} = "{m.group(2)}"')]
        assert len(at) == 1
        depths.append(at[0] / len(lines))
        assert 2000 <= len(doc) <= 8000 + 200
    assert min(depths) < 0.2 and max(depths) > 0.8  # anywhere in the stretch
    with pytest.raises(ValueError, match="holds 9000"):
        next(passkey_documents([text[:100]], 1, 9000, 9500))
    doc = passkey_document(text, random.Random(0), 100, 100)
    assert doc.count("\n") >= 3


def test_several_needles_each_under_its_own_name_all_asked_for():
    text = "".join(f"line_{i} = {i}\n" for i in range(5000))
    for doc in passkey_documents([text], 20, 2000, 6000, seed=5, needles=4):
        body, asks = doc.split("\n\nassert ", 1)
        asked = re.findall(r'(\w+) == "(\d{5})"', "assert " + asks)
        assert len(asked) == 4 and len({n for n, _ in asked}) == 4 and asks.count("\n") == 4
        for name, key in asked:  # each key written once in the body, under its name, on a line of its own
            assert re.findall(rf'^{name} = "(\d{{5}})"', body, re.M) == [key]
    one = list(passkey_documents([text], 5, 2000, 6000, seed=5))
    assert one == list(passkey_documents([text], 5, 2000, 6000, seed=5, needles=1))  # the default draws as before
    with pytest.raises(ValueError, match="needles must be 1 to"):
        passkey_document(text, random.Random(0), 100, 100, needles=len(NAMES) + 1)


def test_data_commands_write_corpora_and_refuse_bad_input_in_one_line(tmp_path, capsys):
    import dsv3.cli as cli

    src = tmp_path / "docs"
    src.mkdir()
    (src / "a.py").write_text("".join(f"v{i} = {i}\n" for i in range(3000)))
    assert cli.main(["data", "passkey", "--inputs", str(src), "-o", str(tmp_path / "pk"), "--count", "5",
                     "--min-chars", "500", "--max-chars", "900"]) == 0
    out = sorted((tmp_path / "pk").glob("*.py"))
    assert len(out) == 5 and all("assert " in p.read_text() for p in out)
    capsys.readouterr()
    for argv in (["data", "passkey", "--inputs", str(tmp_path / "pk"), "-o", str(tmp_path / "x"), "--min-chars", "0"],
                 ["data", "passkey", "--inputs", str(tmp_path / "empty"), "-o", str(tmp_path / "y")],
                 ["data", "passkey", "--inputs", str(src), "-o", str(tmp_path / "z"), "--min-chars", "99999",
                  "--max-chars", "100000"]):
        (tmp_path / "empty").mkdir(exist_ok=True)
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("dsv3: error:") and "\n" not in err, err
