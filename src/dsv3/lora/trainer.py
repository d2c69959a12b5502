"""The LoRA fine-tuning loop: AdamW on the adapters only, warm-up + cosine, accumulation, exact resume.

Exact resume rests on three things being functions of the step alone or saved with it: the rows of
step s (a per-epoch permutation seeded by `seed + epoch`), the LR (a pure function of s), and the
adapter, optimizer and RNG state (dropout) written in each checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dsv3.io.load import load_model
from dsv3.lora.apply import inject_lora, mark_trainable, wrap_frozen_experts
from dsv3.lora.batching import IGNORE, collate, pack_bfd
from dsv3.lora.data import DataError, load_examples
from dsv3.lora.peft_io import load_adapter, read_adapter_config, save_adapter
from dsv3.lora.plot import plot_losses
from dsv3.lora.train_config import FinetuneConfig, FinetuneConfigError
from dsv3.attention import AttentionContext
from dsv3.io.paths import default_model_dir
from dsv3.io.tokenizer import Tokenizer
from dsv3.config import ModelConfig
from dsv3.models.registry import family

STATE_NAME = "trainer_state.pt"


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def rows_of(examples, cfg: FinetuneConfig):
    return pack_bfd(examples, cfg.max_seq_len) if cfg.packing else [[e] for e in examples]


def batch_note(cfg: FinetuneConfig, n_examples: int, n_rows: int, steps: int) -> str:
    """One line saying what a step holds and how often the run sees each example."""
    if cfg.batch_unit == "examples":
        rows = f"packed into rows of up to {cfg.max_seq_len} tokens" if cfg.packing else "one per row"
        return (f"batch: {cfg.batch_size} examples per step, {rows}; "
                f"{steps} steps see each of the {n_examples} examples {steps * cfg.batch_size / n_examples:.1f} times")
    shape = f"rows of up to {cfg.max_seq_len} tokens" + (" (examples packed)" if cfg.packing else " (one example each)")
    hint = "; batch_unit: examples makes batch_size count examples" if n_rows < n_examples else ""
    return (f"batch: {cfg.batch_size} {shape} per step; the {n_examples} examples fill {n_rows} rows, so "
            f"{steps} steps see each example {steps * cfg.batch_size / n_rows:.1f} times{hint}")


def token_loss(model, batch: dict[str, torch.Tensor], device) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over response targets (and their count); attention stays inside each example.

    The LM head runs only where there is a target: prompt positions never reach the (large) vocabulary
    projection, forward or backward.
    """
    b = {k: v.to(device) for k, v in batch.items()}
    # One example per row (padding only trails it): plain causal attention is exact for every real token
    # and lets SDPA use its fused kernel; packed rows need the block-diagonal document mask.
    single = bool((b["doc_ids"].amax(dim=1) <= 0).all())
    ctx = AttentionContext() if single else AttentionContext.causal(doc_ids=b["doc_ids"])
    hidden = model.hidden_states(b["input_ids"], b["positions"], ctx)
    keep = b["targets"] != IGNORE
    logits = model.lm_head(hidden[keep]).float()
    return F.cross_entropy(logits, b["targets"][keep], reduction="sum"), int(keep.sum())


class Trainer:
    """Owns the model, data rows, optimizer and output directory of one fine-tuning run."""

    def __init__(self, cfg: FinetuneConfig, log=print):
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.output_dir)
        self.device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                                   "cpu" if cfg.device == "auto" else cfg.device)
        self.autocast = self.device.type == "cuda" and cfg.bf16
        torch.manual_seed(cfg.seed)
        self.model_dir = Path(cfg.model) if cfg.model else default_model_dir()
        family(ModelConfig.from_dir(self.model_dir).model_type).refuse("finetuning")
        tok = Tokenizer.from_dir(self.model_dir)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        examples, report = load_examples(cfg.data_files, tok, cfg.template, cfg.max_seq_len, cfg.on_bad_example, log)
        evals = []
        if cfg.eval_files:
            evals, _ = load_examples(cfg.eval_files, tok, cfg.template, cfg.max_seq_len, cfg.on_bad_example, log)
        elif cfg.eval_split > 0:
            perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
            n_eval = max(1, int(len(examples) * cfg.eval_split))
            if n_eval >= len(examples):
                raise DataError(f"eval_split {cfg.eval_split} leaves no training examples out of {len(examples)}")
            evals = [examples[i] for i in perm[:n_eval]]
            examples = [examples[i] for i in sorted(perm[n_eval:])]
        self.report = {**report, "train_examples": len(examples), "eval_examples": len(evals)}
        log(f"examples: {report['used']} used, {report['skipped']} skipped; {len(examples)} train, {len(evals)} eval")
        self.rows, self.eval_rows = rows_of(examples, cfg), rows_of(evals, cfg)
        # what one step draws batch_size of: rows (packed with packing on) or single examples, packed per step
        self.units = self.rows if cfg.batch_unit == "rows" else [[e] for e in examples]
        self.total = cfg.train_steps or max(1, math.ceil(cfg.epochs * len(self.units) / cfg.batch_size))
        log(batch_note(cfg, len(examples), len(self.rows), self.total))
        self.warmup = int(cfg.warmup_ratio * self.total)
        dtype = torch.bfloat16 if self.autocast else torch.float32
        self.model = load_model(self.model_dir, dtype=dtype, device=self.device, with_mtp=False, progress=False)
        if cfg.quantization != "none":  # QLoRA: adapters over a frozen int8/int4 base
            from dsv3.lora.qlora import quantize_base

            quantize_base(self.model, cfg.quantization, cfg.group_size)
            log(f"base model quantized to {cfg.quantization} (QLoRA)")
        self.spec = cfg.lora_spec()
        inject_lora(self.model, self.spec)
        self.step = 0
        state = None
        resume = self._resume_dir()
        if resume is not None:
            saved = read_adapter_config(resume)
            if (saved["r"], float(saved["lora_alpha"]), bool(saved.get("use_rslora"))) != (self.spec.r, self.spec.alpha, self.spec.use_rslora):
                raise FinetuneConfigError(f"checkpoint {resume} was trained with other adapter settings (r={saved['r']}, alpha={saved['lora_alpha']})")
            load_adapter(self.model, resume)
            state = torch.load(resume / STATE_NAME, weights_only=True)
            self.step = int(state["step"])
            log(f"resuming from {resume} at step {self.step}")
        wrap_frozen_experts(self.model)
        params = mark_trainable(self.model)
        for p in params:
            p.data = p.data.float()
        self.opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, self.warmup, self.total, cfg.min_lr_ratio))
        self.param_names = [f"{n}{list(p.shape)}" for n, p in self.model.named_parameters() if p.requires_grad]
        if state is not None:
            if state.get("param_names") != self.param_names:
                raise FinetuneConfigError(f"checkpoint {resume} was trained with other adapter settings (rank, targets or routed_experts)")
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            if "cuda_rng" in state and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self._perms: dict[int, list[int]] = {}

    def _resume_dir(self) -> Path | None:
        if not self.cfg.resume:
            return None
        if self.cfg.resume == "auto":
            found = sorted((self.out / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))
            return found[-1] if found else None
        path = Path(self.cfg.resume)
        if not (path / STATE_NAME).is_file():
            raise FinetuneConfigError(f"resume checkpoint {path} has no {STATE_NAME}")
        return path

    def step_rows(self, step: int) -> list:
        """The rows of optimizer step `step`: `batch_size` units (rows, or examples then packed) drawn from a
        fresh seeded permutation each epoch."""
        n, bs = len(self.units), self.cfg.batch_size
        out = []
        for k in range(step * bs, (step + 1) * bs):
            epoch = k // n
            if epoch not in self._perms:
                g = torch.Generator().manual_seed(self.cfg.seed + epoch)
                self._perms = {epoch: torch.randperm(n, generator=g).tolist()}
            out.append(self.units[self._perms[epoch][k % n]])
        if self.cfg.batch_unit == "examples":
            return rows_of([unit[0] for unit in out], self.cfg)
        return out

    def train_step(self) -> dict:
        rows = self.step_rows(self.step)
        mbs = self.cfg.micro_batch_size
        batches = [collate(rows[i:i + mbs], self.pad_id) for i in range(0, len(rows), mbs)]
        n_targets = sum(int((b["targets"] != IGNORE).sum()) for b in batches)
        self.model.train()
        total = 0.0
        for b in batches:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss, _ = token_loss(self.model, b, self.device)
            (loss / max(1, n_targets)).backward()
            total += loss.item()
        params = [p for g in self.opt.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf"))
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        tokens = sum(int((b["doc_ids"] >= 0).sum()) for b in batches)
        return {"step": self.step, "loss": total / max(1, n_targets), "lr": lr, "grad_norm": float(norm), "tokens": tokens}

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total, count = 0.0, 0
        for i in range(0, len(self.eval_rows), self.cfg.micro_batch_size):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss, n = token_loss(self.model, collate(self.eval_rows[i:i + self.cfg.micro_batch_size], self.pad_id), self.device)
            total, count = total + loss.item(), count + n
        return total / max(1, count)

    def save_checkpoint(self) -> Path:
        path = self.out / "checkpoints" / f"step-{self.step}"
        save_adapter(self.model, path, self.spec, str(self.model_dir))
        state = {"step": self.step, "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                 "rng": torch.get_rng_state(), "param_names": self.param_names}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        torch.save(state, path / STATE_NAME)
        return path

    def run(self, progress: bool = True) -> dict:
        cfg, metrics_path = self.cfg, self.out / "metrics.jsonl"
        self.out.mkdir(parents=True, exist_ok=True)
        kept = [line for line in (metrics_path.read_text().splitlines() if metrics_path.is_file() and self.step else [])
                if json.loads(line)["step"] <= self.step]
        metrics_path.write_text("".join(line + "\n" for line in kept))
        history: list[dict] = []
        bar = tqdm(total=self.total, initial=self.step, desc="finetune", disable=not progress)
        with metrics_path.open("a") as mf:
            if self.eval_rows and self.step == 0:  # the starting point the held-out gain is measured from
                history.append({"step": 0, "eval_loss": self.evaluate()})
                mf.write(json.dumps(history[-1]) + "\n")
            while self.step < self.total:
                t0 = time.perf_counter()
                rec = self.train_step()
                rec["tokens_per_s"] = rec["tokens"] / max(1e-9, time.perf_counter() - t0)
                last = self.step == self.total
                if self.eval_rows and ((cfg.eval_every and self.step % cfg.eval_every == 0) or last):
                    rec["eval_loss"] = self.evaluate()
                history.append(rec)
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not last:
                    self.save_checkpoint()
        bar.close()
        save_adapter(self.model, self.out, self.spec, str(self.model_dir))
        png = plot_losses(metrics_path, self.out / "loss.png") if cfg.plot else None
        summary = {**self.report, "steps": self.total, "history": history, "adapter": str(self.out), "plot": str(png) if png else None}
        if history and "loss" in history[-1]:
            self.log(f"done: {self.total} steps, final train loss {history[-1]['loss']:.4f}"
                     + (f", eval loss {history[-1]['eval_loss']:.4f}" if "eval_loss" in history[-1] else "")
                     + f"; adapter in {self.out}")
        return summary


def finetune(cfg: FinetuneConfig, progress: bool = True, log=print) -> dict:
    return Trainer(cfg, log).run(progress)
