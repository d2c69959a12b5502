"""Training checkpoints for exact resume: weights, router biases, optimizer, scheduler, data, RNG.

A checkpoint is `OUT/checkpoints/step-NNNNNNNN/state.pt`, written to a temporary name and
renamed so that a kill mid-write never leaves a half checkpoint behind. The data position is
the step counter (the packed dataset is a pure function of it), so restoring these pieces
replays exactly the run that was interrupted.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from dsv3.errors import CheckpointError

STATE = "state.pt"


def checkpoint_dir(out: str | Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step-{step:08d}"


def latest_checkpoint(out: str | Path) -> Path | None:
    root = Path(out) / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if (p / STATE).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def save_checkpoint(out: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, data_state: dict, model_config: dict, keep: int = 2) -> Path:
    """Write the state after `step` optimizer steps and prune all but the `keep` newest."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "data": data_state, "rng": rng, "model_config": model_config}
    path = checkpoint_dir(out, step)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (STATE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path / STATE)
    older = sorted(p for p in (Path(out) / "checkpoints").glob("step-*") if p != path)
    for stale in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return path


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    model_config: dict) -> dict:
    """Restore everything in place; return the checkpoint dict (for `step` and `data`)."""
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: name it instead of a pickle traceback
        raise CheckpointError(f"cannot read training checkpoint {path / STATE}: {str(e).splitlines()[0]}") from None
    if state["model_config"] != model_config:
        changed = sorted(k for k in set(state["model_config"]) | set(model_config)
                         if state["model_config"].get(k) != model_config.get(k))
        raise CheckpointError(f"checkpoint {path} was trained with a different model shape ({', '.join(changed)}); "
                              "use another `out` or set resume: false.")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state
