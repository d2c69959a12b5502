"""The multi-process engine: rank 0 schedules and samples, every rank runs the same model forward.

Rank 0 owns the `LLMEngine` (scheduler, block manager, sampling, tokenizer). Its runner is wrapped
so that each call — a step's `StepItem`s, an MTP drafting call, or a head call made outside a step
(prompt logprobs) — is first broadcast over the gloo control group; the other ranks replay it on
their own shard and paged latent cache (same block ids, so the same slots) and take part in the
collectives. Rank 0 broadcasts "stop" on shutdown; a rank that dies makes the next collective
raise on the others instead of hanging (the server then reports unhealthy).
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsv3.engine import EngineConfig, EngineDeadError, LLMEngine
from dsv3.engine.runner import ModelRunner
from dsv3.parallel import dist as pdist
from dsv3.parallel.dist import ParallelConfig, ParallelError
from dsv3.parallel.layers import ParallelHead, QuantParallelHead
from dsv3.parallel.load import load_sharded, memory_report, rss


def send(obj: Any) -> Any:
    """Broadcast one command from rank 0 (tensors travel as CPU tensors); returns it on every rank."""
    if not dist.is_initialized():  # a world of one
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=pdist.control_group())
    return box[0]


def agree(error: str | None) -> None:
    """Every rank reports its load outcome; all raise if any rank failed (instead of hanging later)."""
    errors = [error]
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error, group=pdist.control_group())
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        raise ParallelError(f"rank {failed[0][0]} failed to start: {failed[0][1]}")


class RankFailure(EngineDeadError):
    """Another rank stopped (crashed, killed, lost its host): this engine cannot continue."""


class DriverRunner:
    """Rank 0's runner: broadcast each call, then run it locally (everything else is the inner runner's)."""

    def __init__(self, inner: ModelRunner):
        self.inner, self.in_step = inner, False
        head = inner.model.lm_head
        if isinstance(head, (ParallelHead, QuantParallelHead)):
            head.on_call = self._head_called

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _head_called(self, x: torch.Tensor) -> None:
        if not self.in_step:  # e.g. prompt logprobs: the other ranks must join the all_gather
            send(("head", x.detach().cpu()))

    def _run(self, op: str, *args: Any) -> Any:
        self.in_step = True
        try:
            send((op, *(a.detach().cpu() if isinstance(a, torch.Tensor) else a for a in args)))
            return getattr(self.inner, op)(*args)
        except RankFailure:
            raise
        except Exception as e:
            # gloo reports a dead peer as a plain RuntimeError, NCCL as DistError. Any other error in a replayed
            # forward is fatal too: the other ranks may already wait in a collective this rank never reaches,
            # so the engine cannot re-run parts of the batch the way a single-process engine isolates a fault.
            if isinstance(e, dist.DistError) or any(w in str(e) for w in ("gloo", "NCCL", "closed by peer")):
                raise RankFailure(f"a parallel rank stopped during {op}: {str(e).splitlines()[0]}") from e
            raise RankFailure(f"the parallel {op} failed on rank 0 ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              "the ranks may be out of step") from e
        finally:
            self.in_step = False

    def execute(self, items):
        return self._run("execute", items)

    def execute_mtp(self, items, hidden_in: torch.Tensor):
        return self._run("execute_mtp", items, hidden_in)


@torch.inference_mode()
def worker_loop(runner: ModelRunner) -> None:
    """Ranks > 0: replay rank 0's calls until "stop"."""
    dev = runner.device
    while True:
        op, *args = send(None)
        if op == "stop":
            return
        args = [a.to(dev) if isinstance(a, torch.Tensor) else a for a in args]
        if op == "head":
            runner.model.lm_head(*args)
        else:
            getattr(runner, op)(*args)


@dataclass
class LaunchSpec:
    model_dir: str
    tp: int = 1
    ep: int = 1
    dtype: str = "auto"
    device: str = "cpu"
    progress: bool = True
    port: int = 0
    quantization: str | None = None  # "fp8" keeps an FP8 checkpoint in FP8; awq/gptq/compressed-tensors: checked before


def _load(spec: LaunchSpec, rank: int, world: int, addr: str | None):
    dev = pdist.init(rank, world, spec.device, addr, spec.port)
    try:
        baseline = rss()
        model = load_sharded(spec.model_dir, ParallelConfig(spec.tp, spec.ep, rank), spec.dtype, dev,
                             progress=spec.progress and rank == 0, quantization=spec.quantization)
        print(memory_report(model, rank, baseline), file=sys.stderr, flush=True)
    except Exception as e:  # reported to every rank by `agree`
        agree(f"{type(e).__name__}: {e}")
        raise
    agree(None)
    return model


def run_worker(spec: LaunchSpec, rank: int, world: int, addr: str | None) -> None:
    """A rank > 0 from start to clean exit."""
    try:
        model = _load(spec, rank, world, addr)
        num_blocks, block_size, kv_dtype = send(None)
        worker_loop(ModelRunner(model, num_blocks, block_size, kv_dtype))
    finally:
        pdist.shutdown()


def _spawned(rank: int, spec: LaunchSpec, world: int) -> None:
    try:
        run_worker(spec, rank, world, "127.0.0.1")
    except ParallelError:  # rank 0 reports it
        sys.exit(1)
    except Exception:
        traceback.print_exc()
        sys.exit(1)


@dataclass
class ParallelEngine:
    """Rank 0's handle: `engine` is an ordinary `LLMEngine`; `shutdown()` stops every rank."""

    engine: LLMEngine
    procs: list = field(default_factory=list)

    def healthy(self) -> bool:
        """False once a spawned rank has exited (for a server's /health; a step would raise `RankFailure`)."""
        return all(p.is_alive() for p in self.procs)

    def shutdown(self) -> None:
        try:
            if dist.is_initialized():
                send(("stop",))
        except Exception:  # a rank already died: nothing left to tell
            pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        pdist.shutdown()

    def __enter__(self) -> "ParallelEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def start_engine(model_dir: str | Path, tensor_parallel_size: int = 1, expert_parallel_size: int = 1,
                 dtype: str = "auto", device: str = "cpu", config: EngineConfig | None = None,
                 progress: bool = True, port: int | None = None, quantization: str | None = None) -> ParallelEngine | None:
    """Start every rank. Under torchrun each process calls this: rank 0 gets the engine, others serve and get None.

    Outside torchrun this process becomes rank 0 and spawns the other ranks on 127.0.0.1, meeting them on
    `port` (default: a free one). Quantized checkpoints run packed on every rank (`load_sharded`); `quantization`
    is "fp8" (keep an FP8 checkpoint in FP8) or names the packing the files must hold (awq, gptq, compressed-tensors).
    """
    from dsv3.io.load import DECLARED, check_declared
    from dsv3.io.tokenizer import Tokenizer

    pc = ParallelConfig(tensor_parallel_size, expert_parallel_size)
    if quantization in DECLARED:
        check_declared(model_dir, quantization)
        quantization = None
    elif quantization is not None and quantization != "fp8":
        raise ParallelError(f"--quantization {quantization} quantizes while loading, which parallel runs do not do: write a "
                            f"quantized checkpoint with `dsv3 quantize --method {quantization}` and run that")
    spec = LaunchSpec(str(model_dir), pc.tp, pc.ep, dtype, device, progress, quantization=quantization)
    procs, addr = [], None
    if pdist.launched_by_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world != pc.world:
            raise ParallelError(f"torchrun started {world} processes but the layout needs {pc.world}")
        if rank != 0:
            run_worker(spec, rank, world, None)
            return None
    else:
        rank, world, addr = 0, pc.world, "127.0.0.1"
        spec.port = port or pdist.free_port()
        ctx = mp.get_context("spawn")
        for r in range(1, world):
            p = ctx.Process(target=_spawned, args=(r, spec, world), daemon=True)
            p.start()
            procs.append(p)
    try:
        model = _load(spec, 0, world, addr)
        engine = LLMEngine(model, Tokenizer.from_dir(model_dir), config)
        r = engine.runner
        send((r.cache.data.shape[1] // r.block_size, r.block_size, "int8" if r.cache.quantized else "auto"))
    except BaseException:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        pdist.shutdown()
        raise
    engine.runner = DriverRunner(engine.runner)
    if engine.drafter is not None:
        engine.drafter.runner = engine.runner
    return ParallelEngine(engine, procs)
