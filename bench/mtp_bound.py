"""Where an MTP speculative step's time goes, and the speed-up its parts allow, on one model in one run.

    python bench/mtp_bound.py [--model DIR] [--threads 2] [--tokens 256] [--prompts 8] [--rounds 3]

Greedy batch-1 decoding of the same prompts through the engine (`LLM`), plain and with one MTP draft per step
(`num_speculative_tokens=1`; outputs must be identical). Each engine step is timed, and inside it the model's main
forward (`ModelRunner.execute`: 1 token plain, 2 tokens when verifying a draft) and the MTP module's forward
(`ModelRunner.execute_mtp`: the draft, which applies the shared LM head again). Printed per mode: ms per step,
ms in the main forward and in the draft, the rest (scheduling, sampling, verification in Python), tokens per step.

The bound: with a k=1 step made of a verify forward (v × a plain forward) and a draft (c × a plain forward) and no
other cost, the speed-up over plain decoding is at most E[tokens per step] / (v + c), E = 1 + acceptance.
Issue 22 asks for 1.3×; this shows whether the model's shape allows it (a draft that reads the head costs c ≈ the
head's share of a step) before the Python around the step is moved into the native call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


class Timers:
    """Wall time of the engine's steps and of the runner's two forwards, per step."""

    def __init__(self, engine):
        self.engine, self.steps, self.main, self.mtp = engine, [], [], []
        self._step, self._exec, self._mtp = engine.step, engine.runner.execute, engine.runner.execute_mtp
        engine.step, engine.runner.execute, engine.runner.execute_mtp = self.step, self.execute, self.execute_mtp

    def step(self):
        self.main.append(0.0)
        self.mtp.append(0.0)
        t = time.perf_counter()
        out = self._step()
        self.steps.append(time.perf_counter() - t)
        return out

    def execute(self, items):
        t = time.perf_counter()
        out = self._exec(items)
        self.main[-1] += time.perf_counter() - t
        return out

    def execute_mtp(self, items, hidden):
        t = time.perf_counter()
        out = self._mtp(items, hidden)
        self.mtp[-1] += time.perf_counter() - t
        return out

    def restore(self) -> None:
        self.engine.step, self.engine.runner.execute, self.engine.runner.execute_mtp = self._step, self._exec, self._mtp


def run(llm, prompts: list[list[int]], tokens: int) -> tuple[list[list[int]], dict]:
    """Decode each prompt alone (batch 1); per-step medians over the decode steps (prefill steps left out)."""
    from dsv3 import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    outs, steps, main, mtp, produced = [], [], [], [], 0
    for p in prompts:
        timers = Timers(llm.engine)
        try:
            out = llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids
        finally:
            timers.restore()
        outs.append(out)
        decode = slice(1, None)  # the first step is the prefill
        steps += timers.steps[decode]
        main += timers.main[decode]
        mtp += timers.mtp[decode]
        produced += len(out) - 1
    return outs, {"step_ms": 1e3 * statistics.median(steps), "main_ms": 1e3 * statistics.median(main),
                  "mtp_ms": 1e3 * statistics.median(mtp), "tokens_per_step": produced / len(steps),
                  "tok_s": produced / sum(steps)}


def main(argv: list[str] | None = None) -> int:
    from dsv3 import LLM
    from dsv3.io.paths import default_model_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint with an MTP layer (default: the embedded model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256, help="new tokens per prompt")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="alternating plain / MTP runs; the best tok/s of each is kept")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = args.model or default_model_dir()
    plain, spec = LLM(model), LLM(model, num_speculative_tokens=1)
    tok = plain.tokenizer
    starts = ["def ", "class ", "import os\n", "    return ", "for i in range(", "if __name__", "# ", "with open("]
    prompts = [tok.encode(starts[i % len(starts)], add_special_tokens=True) for i in range(args.prompts)]
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, llm in (("plain", plain), ("mtp k=1", spec)):
            outs, fig = run(llm, prompts, args.tokens)
            if name == "plain":
                reference = outs
            elif outs != reference:
                print("error: MTP decoding changed the greedy output", file=sys.stderr)
                return 1
            if name not in best or fig["tok_s"] > best[name]["tok_s"]:
                best[name] = fig
    p, s = best["plain"], best["mtp k=1"]
    c = s["mtp_ms"] / p["main_ms"]
    v = s["main_ms"] / p["main_ms"]
    accepted = s["tokens_per_step"] - 1
    print(f"model {model} · batch 1 · greedy · {args.threads} thread(s) · {args.prompts} prompts × {args.tokens} tokens · "
          f"best of {args.rounds} · medians per decode step")
    print(f"{'mode':<10}{'tok/s':>9}{'ms/step':>9}{'main fwd':>10}{'MTP draft':>11}{'rest':>8}{'tokens/step':>13}")
    for name, f in best.items():
        rest = f["step_ms"] - f["main_ms"] - f["mtp_ms"]
        print(f"{name:<10}{f['tok_s']:>9.0f}{f['step_ms']:>9.3f}{f['main_ms']:>10.3f}{f['mtp_ms']:>11.3f}{rest:>8.3f}"
              f"{f['tokens_per_step']:>13.2f}")
    print(f"measured: MTP k=1 decodes {s['tok_s'] / p['tok_s']:.2f}x plain (greedy output identical); acceptance {accepted:.1%}")
    print(f"parts, as multiples of a plain main forward: verify v = {v:.2f}, draft c = {c:.2f}")
    print(f"bound with no other cost: (1 + acceptance) / (v + c) = {(1 + accepted) / (v + c):.2f}x; "
          f"1.3x would need v + c <= {(1 + accepted) / 1.3:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
