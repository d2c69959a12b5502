"""Does a model copy from its context? Nats per token saved on a list the second time it appears, by distance.

    python bench/copy_benefit.py [--models long,default] [--docs 40] [--out bench/results/copy_benefit]

Passkey retrieval (`dsv3 eval needle`) is all or nothing: a model scores 0 % until it copies five digits exactly, so
it cannot say whether training is getting closer. This is the graded precursor. Each document is a list of six
identifiers (drawn from dsv3's own sources), filler words, then the same list again:

    items = [count, it, cat, needs, samples, are]
    <filler>
    again = [count, it, cat, needs, samples, are]

The benefit is the list's mean NLL (nats/token, teacher-forced) the first time minus the second time, at growing
filler lengths. A model that copies (an induction head: find the earlier occurrence, predict what followed it) saves
nats at every distance its attention reaches. One that does not saves about nothing. Models are names (`default`,
`long`) or directories. Prints the table and writes `results.json` and `copy_benefit.png`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FILLERS = (0, 10, 25, 50, 100, 200)


def vocabulary() -> list[str]:
    """Identifiers of the engine's source: local, fixed, and many tokens long on average."""
    text = (ROOT / "src/dsv3/engine/llm_engine.py").read_text(encoding="utf-8")
    for ch in "().,[]:=\"'":
        text = text.replace(ch, " ")
    return sorted({w for w in text.split() if w.isidentifier()})


def documents(words: list[str], filler: int, n: int, seed: int) -> list[str]:
    rng = random.Random(seed * 1000 + filler)
    docs = []
    for _ in range(n):
        items = ", ".join(rng.choice(words) for _ in range(6))
        fill = " ".join(rng.choice(words) for _ in range(filler))
        docs.append(f"items = [{items}]\n{fill}\nagain = [{items}]\n")
    return docs


def benefit(llm, docs: list[str]) -> tuple[float, float, float]:
    """(mean NLL of the first list, of the second, mean token distance between them) over `docs`."""
    tok = llm.tokenizer
    seqs, spans = [], []
    for d in docs:
        cut = (d.index("[") + 1, d.index("]\n"), d.rindex("[") + 1, d.rindex("]\n"))
        a0, a1, b0, b1 = (len(tok.encode(d[:c])) for c in cut)
        seqs.append(tok.encode(d[:cut[3]]))
        spans.append((a0, a1, b0, b1))
    first = second = n1 = n2 = dist = 0.0
    for out, (a0, a1, b0, b1) in zip(llm.score(seqs), spans):
        lp = list(out.logprobs)  # lp[i]: log p(token i + 1 | tokens .. i)
        first -= sum(lp[a0 - 1:a1 - 1])
        second -= sum(lp[b0 - 1:b1 - 1])
        n1, n2, dist = n1 + a1 - a0, n2 + b1 - b0, dist + b0 - a0
    return first / n1, second / n2, dist / len(docs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="long,default", help="comma list of model names or directories")
    ap.add_argument("--docs", type=int, default=40, help="documents per filler length")
    ap.add_argument("--fillers", default=",".join(map(str, FILLERS)), help="filler words between the two lists")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/copy_benefit")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from dsv3 import LLM
    from dsv3.io.paths import model_path

    words, fillers = vocabulary(), [int(f) for f in a.fillers.split(",")]
    rows = []
    for name in a.models.split(","):
        llm = LLM(str(model_path(name)), dtype="float32", max_model_len=4096)
        for f in fillers:
            first, second, dist = benefit(llm, documents(words, f, a.docs, a.seed))
            rows.append({"model": name, "filler_words": f, "distance_tokens": dist, "first_nll": first,
                         "second_nll": second, "benefit": first - second})
            print(f"{name:>10s}  distance {dist:6.0f} tokens  first {first:.2f}  again {second:.2f}  "
                  f"saved {first - second:+.2f} nats/token", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(rows, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name in a.models.split(","):
        pts = [r for r in rows if r["model"] == name]
        ax.plot([r["distance_tokens"] for r in pts], [r["benefit"] for r in pts], marker="o", label=name)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("tokens between the two lists")
    ax.set_ylabel("nats/token saved the second time")
    ax.set_title("Copying from context")
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out / "copy_benefit.png", dpi=120)
    print(f"wrote {a.out / 'results.json'} and {a.out / 'copy_benefit.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
