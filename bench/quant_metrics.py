"""Quality of quantized systems against the full-precision model, on the same token windows.

Scoring is window-major: for each window the reference (dsv3 fp32) runs once and every system is
compared with it right away, so no full vocabulary distributions are kept and the whole held-out
split can be scored. Metrics (those llama.cpp's perplexity tool reports, plus routing for MoE):

* perplexity exp(mean NLL of the actual next tokens) and its ratio to the reference's, with the
  standard error of the ratio over windows (the spread of per-window mean NLL differences);
* mean KL(reference ‖ system) of the next-token distributions, in nats;
* top-1 agreement: share of positions whose argmax equals the reference's;
* routing agreement: share of (token, MoE layer) whose chosen expert set is unchanged (dsv3 only).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

Output = tuple[torch.Tensor, torch.Tensor | None]  # (log-probs [T-1, V] fp32, sorted expert ids [layers, T, K] or None)
System = Callable[[torch.Tensor], Output]  # one window [T] -> its outputs


def dsv3_system(model) -> System:
    """Next-token log-probs and the expert sets chosen in every MoE layer (MTP does not run)."""
    moes = [blk.mlp for blk in model.model.layers if hasattr(blk.mlp, "track_load")]
    for m in moes:
        m.track_load = True

    @torch.inference_mode()
    def run(w: torch.Tensor) -> Output:
        logp = model(w[None]).float().log_softmax(-1)[0, :-1]
        return logp, (torch.stack([m.last_routing[1].sort(-1)[0] for m in moes]) if moes else None)
    return run


def logits_system(logits_of: Callable[[list[int]], torch.Tensor]) -> System:
    """From a function returning the logits [T, V] of all positions of a token list (e.g. llama.cpp)."""
    return lambda w: (logits_of(w.tolist()).float().log_softmax(-1)[:-1], None)


class Tally:
    """Running sums of one system's differences from the reference."""

    def __init__(self):
        self.nll, self.d_nll, self.kl, self.top1, self.n = 0.0, [], 0.0, 0, 0
        self.routed = self.same = 0

    def add(self, ref: Output, got: Output, target: torch.Tensor) -> None:
        (rl, rr), (gl, gr) = ref, got
        if gl.shape != rl.shape:
            raise ValueError(f"log-probs of shape {list(gl.shape)}, the reference has {list(rl.shape)}")
        nll = -gl.gather(-1, target[:, None]).sum().item()
        self.nll += nll
        self.d_nll.append((nll + rl.gather(-1, target[:, None]).sum().item()) / target.numel())
        self.kl += F.kl_div(gl, rl, log_target=True, reduction="none").sum(-1).sum().item()
        self.top1 += (gl.argmax(-1) == rl.argmax(-1)).sum().item()
        self.n += target.numel()
        if gr is not None and rr is not None:
            match = (gr == rr).all(-1)
            self.routed, self.same = self.routed + match.numel(), self.same + match.sum().item()

    def result(self) -> dict:
        d = torch.tensor(self.d_nll, dtype=torch.float64)
        se = (d.std() / math.sqrt(len(d))).item() if len(d) > 1 else float("nan")
        ratio = math.exp(d.mean().item())
        return {"ppl": math.exp(self.nll / self.n), "ppl_ratio": ratio, "ppl_ratio_se": ratio * se, "kl": self.kl / self.n,
                "top1": self.top1 / self.n, "routing": self.same / self.routed if self.routed else float("nan")}


def score(reference: System, systems: dict[str, System], windows: torch.Tensor, progress: bool = True) -> dict[str, dict]:
    """name -> metrics of each system against `reference` (which scores itself too, under 'reference')."""
    tallies = {"reference": Tally(), **{name: Tally() for name in systems}}
    for w in tqdm(windows, desc="scoring held-out windows", disable=not progress):
        ref = reference(w)
        tallies["reference"].add(ref, ref, w[1:])
        for name, system in systems.items():
            tallies[name].add(ref, system(w), w[1:])
    return {name: t.result() for name, t in tallies.items()}
