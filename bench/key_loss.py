"""Does a model retrieve passkeys at all? Nats per 5-digit key, where it is set and where it is asked for.

    python bench/key_loss.py [--models long,default] [--docs 30] [--needles 16] [--haystack DIR]
                             [--out bench/results/key_loss]

The needle score (`dsv3 eval needle`) counts exact greedy answers, so a model scores 0 % until it gets all five
digits right. This is its graded form on the training format of the long model's passkey documents
(`dsv3.data.long_docs.passkey_document`: `NAME = "48213"` lines at random depths of a stretch of code, then
`assert NAME == "48213"` for each, in a random order). Teacher-forced, per document: the key's NLL where it is set
(nothing earlier predicts it: about ln 1e5 = 11.51 nats for a model that learned the format) and where it is asked
for. The difference is what retrieval saves; a model that copies the key saves most of the 11.5 nats. The stretches
come from `--haystack` (`.py` files, e.g. `dsv3 data packages --split heldout`) or the standard library's sources.
Prints one row per model; writes results.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KEY = re.compile(r'^(\w+) = "(\d{5})"', re.M)
ASK = re.compile(r'^assert (\w+) == "(\d{5})"', re.M)


def documents(texts: list[str], n: int, needles: int, min_chars: int, max_chars: int, seed: int) -> list[str]:
    """`n` passkey documents, drawn as `dsv3 data passkey` draws its training ones."""
    from dsv3.data.long_docs import passkey_documents

    try:
        return list(passkey_documents(texts, n, min_chars, max_chars, seed, needles))
    except ValueError as e:
        raise SystemExit(str(e)) from None


def spans(tok, doc: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Token spans [a, b) of each key where it is set and where it is asked for."""
    def at(pattern: re.Pattern) -> list[tuple[int, int]]:
        return [(len(tok.encode(doc[:m.start(2)])), len(tok.encode(doc[:m.end(2)]))) for m in pattern.finditer(doc)]
    return at(KEY), at(ASK)


def key_nll(llm, docs: list[str]) -> tuple[float, float, int]:
    """(mean NLL of a key where it is set, where it is asked for, keys asked for) over `docs`."""
    tok = llm.tokenizer
    seqs = [tok.encode(d) for d in docs]
    cut = [spans(tok, d) for d in docs]
    nll = {"set": [], "ask": []}
    for out, (sets, asks) in zip(llm.score(seqs), cut):
        lp = list(out.logprobs)  # lp[i]: log p(token i + 1 | tokens .. i)
        for name, where in (("set", sets), ("ask", asks)):
            nll[name] += [-sum(lp[a - 1:b - 1]) for a, b in where]
    return sum(nll["set"]) / len(nll["set"]), sum(nll["ask"]) / len(nll["ask"]), len(nll["ask"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="long,default", help="comma list of model names or directories")
    ap.add_argument("--docs", type=int, default=30)
    ap.add_argument("--needles", type=int, default=16, help="keys per document (1-16)")
    ap.add_argument("--min-chars", type=int, default=600)
    ap.add_argument("--max-chars", type=int, default=1600)
    ap.add_argument("--haystack", type=Path, help="directory of .py documents (default: the standard library's sources)")
    ap.add_argument("--seed", type=int, default=99)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/key_loss")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from dsv3 import LLM
    from dsv3.eval.needle import default_haystack
    from dsv3.io.paths import model_path

    if a.haystack:
        texts = [p.read_text(encoding="utf-8") for p in sorted(a.haystack.glob("*.py"))]
    else:
        texts = default_haystack().split("\n\n\n")
    docs = documents(texts, a.docs, a.needles, a.min_chars, a.max_chars, a.seed)
    rows = []
    for name in a.models.split(","):
        llm = LLM(str(model_path(name)), dtype="float32", max_model_len=4096)
        where_set, asked, n = key_nll(llm, docs)
        rows.append({"model": name, "keys": n, "set_nll": where_set, "ask_nll": asked, "saved": where_set - asked})
        print(f"{name:>10s}  {n} keys  set {where_set:.2f}  asked {asked:.2f}  saved {where_set - asked:+.2f} nats "
              f"per key (a uniform guess: 11.51)", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows},
                                                   indent=1))
    print(f"wrote {a.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
