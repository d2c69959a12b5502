"""Where an MTP speculative step's time goes, on one model in one run.

    python bench/mtp_bound.py [--model DIR] [--threads 2] [--tokens 256] [--prompts 8] [--rounds 3] [--k 1,2]

Greedy batch-1 decoding of the same prompts through the engine (`LLM`), plain and with k MTP drafts per step
(outputs must be identical). Each engine step is timed, and inside it: the main model's forward
(`ModelRunner.execute`: plain decoding, and the general speculative path's verification), the MTP module's forward
in Python (`ModelRunner.execute_mtp`: catching a sequence up after its prompt) and the native speculative call
(`ModelRunner.execute_spec`, `dsv3::mtp_step`: verify, accept and draft the next step in one call). Printed per
mode: ms per step, ms in each, the rest (scheduling, output bookkeeping in Python), tokens per step, and the
native call's cost in plain forwards against the tokens it yields.
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
        self.engine, self.steps, self.main, self.mtp, self.spec = engine, [], [], [], []
        r = engine.runner
        self._step, self._exec, self._mtp, self._spec = engine.step, r.execute, r.execute_mtp, r.execute_spec
        engine.step, r.execute, r.execute_mtp, r.execute_spec = self.step, self.execute, self.execute_mtp, self.execute_spec

    def step(self):
        self.main.append(0.0)
        self.mtp.append(0.0)
        self.spec.append(0.0)
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

    def execute_spec(self, items, k):
        t = time.perf_counter()
        out = self._spec(items, k)
        self.spec[-1] += time.perf_counter() - t
        return out

    def restore(self) -> None:
        r = self.engine.runner
        self.engine.step, r.execute, r.execute_mtp, r.execute_spec = self._step, self._exec, self._mtp, self._spec


def run(llm, prompts: list[list[int]], tokens: int) -> tuple[list[list[int]], dict]:
    """Decode each prompt alone (batch 1); per-step medians over the decode steps (prefill steps left out)."""
    from dsv3 import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    outs, steps, main, mtp, spec, produced = [], [], [], [], [], 0
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
        spec += timers.spec[decode]
        produced += len(out) - 1
    return outs, {"step_ms": 1e3 * statistics.median(steps), "main_ms": 1e3 * statistics.median(main),
                  "mtp_ms": 1e3 * statistics.median(mtp), "spec_ms": 1e3 * statistics.median(spec),
                  "tokens_per_step": produced / len(steps),
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
    ap.add_argument("--k", default="1,2", help="draft counts to run")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = args.model or default_model_dir()
    systems = {"plain": LLM(model)}
    for k in map(int, args.k.split(",")):
        systems[f"mtp k={k}"] = LLM(model, num_speculative_tokens=k)
    tok = systems["plain"].tokenizer
    starts = ["def ", "class ", "import os\n", "    return ", "for i in range(", "if __name__", "# ", "with open("]
    prompts = [tok.encode(starts[i % len(starts)], add_special_tokens=True) for i in range(args.prompts)]
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, llm in systems.items():
            outs, fig = run(llm, prompts, args.tokens)
            if name == "plain":
                reference = outs
            elif outs != reference:
                print(f"error: {name} changed the greedy output", file=sys.stderr)
                return 1
            if name not in best or fig["tok_s"] > best[name]["tok_s"]:
                best[name] = fig
    p = best["plain"]
    print(f"model {model} · batch 1 · greedy · {args.threads} thread(s) · {args.prompts} prompts × {args.tokens} tokens · "
          f"best of {args.rounds} · medians per decode step (ms)")
    print(f"{'mode':<10}{'tok/s':>9}{'x plain':>9}{'step':>8}{'forward':>9}{'native spec':>13}{'MTP (py)':>10}{'rest':>8}"
          f"{'tokens/step':>13}")
    for name, f in best.items():
        rest = f["step_ms"] - f["main_ms"] - f["mtp_ms"] - f["spec_ms"]
        print(f"{name:<10}{f['tok_s']:>9.0f}{f['tok_s'] / p['tok_s']:>9.2f}{f['step_ms']:>8.3f}{f['main_ms']:>9.3f}"
              f"{f['spec_ms']:>13.3f}{f['mtp_ms']:>10.3f}{rest:>8.3f}{f['tokens_per_step']:>13.2f}")
    for name, f in best.items():
        if f["spec_ms"]:
            print(f"{name}: the native call costs {f['spec_ms'] / p['main_ms']:.2f} plain forwards and yields "
                  f"{f['tokens_per_step']:.2f} tokens (acceptance {(f['tokens_per_step'] - 1):.2f} drafts per step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
