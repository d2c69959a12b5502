"""`pretrain(cfg)`: the DeepSeek-V3 pretraining loop on packed token shards.

One optimizer step = `grad_accum` micro-batches of `batch_size` packed windows. Per step: the
loss is next-token CE + λ·MTP CE (+ α·sequence balance loss); routed-expert loads are counted
during the forwards and, after clipping and before AdamW steps, move each router's selection
bias by ±γ (aux-loss-free balancing). fp32 on CPU, bf16 autocast on GPU (routers stay fp32); the LM
head's fused cross-entropy can run its matmuls in bf16 (`head_dtype`), which AMX CPUs do ~3x faster.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import time
from functools import partial
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from dsv3.io.checkpoint import save_model
from dsv3.config import ModelConfig
from dsv3.models.context_length import TRAINED_KEY
from dsv3.data import DataError, DataMix, FIMTokens, PackedDataset, TokenShards, load_manifest
from dsv3.io.tokenizer import Tokenizer
from dsv3.models.interface import CausalLM
from dsv3.models.registry import family
from dsv3.train.balance import load_stats, moe_layers, track_load, update_bias
from dsv3.train.config import PretrainConfig, PretrainConfigError
from dsv3.train.distributed import DataParallel
from dsv3.train.fused_ce import bf16_matmul_is_fast
from dsv3.train.losses import heldout_loss, index_layers, pretrain_losses
from dsv3.train.schedule import make_scheduler, piecewise
from dsv3.train.state import latest_checkpoint, load_checkpoint, save_checkpoint

METRICS = "metrics.jsonl"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PretrainConfigError(f"device {name!r} was asked for but CUDA is not available.")
    return torch.device(name)


def model_config(cfg: PretrainConfig, manifest: dict, tokenizer_dir: str) -> ModelConfig:
    """The config's model dict (over `init_from`'s config.json), with vocabulary size and special ids
    filled in from the data."""
    from dsv3.io.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tokenizer_dir)
    base = ModelConfig.from_dir(cfg.init_from).to_dict() if cfg.init_from else {}
    raw = {"model_type": "deepseek_v3", "vocab_size": manifest["tokenizer"]["vocab_size"],
           "bos_token_id": tok.bos_token_id, "eos_token_id": manifest["tokenizer"]["eos_id"],
           "pad_token_id": tok.pad_token_id, **base, **cfg.model}
    mc = ModelConfig.from_dict(raw)
    if mc.vocab_size < manifest["tokenizer"]["vocab_size"]:
        raise PretrainConfigError(f"model.vocab_size {mc.vocab_size} is smaller than the data's vocabulary "
                                  f"({manifest['tokenizer']['vocab_size']}).")
    if cfg.seq_len > mc.max_position_embeddings:
        raise PretrainConfigError(f"seq_len {cfg.seq_len} exceeds model.max_position_embeddings {mc.max_position_embeddings}.")
    return mc


def build_optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, norms (1-D) do not. Router biases are buffers, never optimized."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             fused=False, foreach=False)


class MetricsLog:
    """Append-only JSONL; on resume, lines past the resumed step are dropped (they get redone)."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        self.rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.is_file() else []
        self.rows = [r for r in self.rows if r["step"] <= resume_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def write(self, row: dict) -> None:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def pretrain(cfg: PretrainConfig) -> dict:
    """Train (or resume) per `cfg`; return a summary with the last train and held-out losses."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dp = DataParallel(resolve_device(cfg.device))
    device = dp.device
    manifest = load_manifest(cfg.data)
    tokenizer_dir = cfg.tokenizer or manifest["tokenizer"]["path"]
    train_shards, held_shards = TokenShards(cfg.data, "train"), TokenShards(cfg.data, "heldout")
    tok = Tokenizer.from_dir(tokenizer_dir) if cfg.fim_rate > 0 else None
    fim = FIMTokens.from_tokenizer(tok.backend) if tok is not None else None
    mix = cfg.mix_rows()
    packed = partial(PackedDataset, seq_len=cfg.seq_len, seed=cfg.seed, fim_rate=cfg.fim_rate, fim_tokens=fim,
                     fim_level=cfg.fim_level, tokenizer=tok, rank=dp.rank, world_size=dp.world)
    data = packed(train_shards, batch_size=cfg.batch_size - sum(rows for _, rows in mix))
    if mix:
        data = DataMix([data] + [packed(mix_shards(path, manifest), batch_size=rows) for path, rows in mix])
    heldout = PackedDataset(held_shards, cfg.seq_len, cfg.batch_size, seed=cfg.seed, shuffle=False)

    mc = model_config(cfg, manifest, tokenizer_dir)
    torch.manual_seed(cfg.seed)
    fam = family(mc.model_type)
    fam.refuse("training")
    if fam.whole_sequences and cfg.doc_mask:
        raise PretrainConfigError(f"{mc.model_type} trains on whole windows only (its compressed attention follows the "
                                  "token positions of one sequence): set doc_mask: false, packing documents without "
                                  "cross-document attention masking, as DeepSeek-V3 pretrained.")
    model = fam.model_class()(mc)
    init = {"kv_gain": cfg.kv_norm_init} if cfg.kv_norm_init != 1.0 else {}
    if init and "kv_gain" not in inspect.signature(model.init_weights).parameters:
        raise PretrainConfigError(f"kv_norm_init applies to models whose queries are normalised without a gain "
                                  f"(deepseek_v4), not to {mc.model_type}: leave it at 1.0.")
    model.init_weights(cfg.init_std, **init)
    if cfg.init_from:
        init_weights_from(model, cfg.init_from)
    model.to(device)
    moes = moe_layers(model)
    indexed = index_layers(model)
    optimizer = build_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)

    out = Path(cfg.out)
    if dp.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "pretrain.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    dp.barrier()
    start = 0
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler, mc.to_dict())
        start = int(state["step"])
        data.load_state_dict(state["data"])
    log = MetricsLog(out / METRICS, start) if dp.is_main else None
    if cfg.compile:
        for block in list(model.model.layers) + [m.block for m in model.model.mtp]:
            block.compile()
    autocast = (partial(torch.autocast, device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext)
    bf16_head = cfg.head_dtype == "bfloat16" or (cfg.head_dtype == "auto" and bf16_matmul_is_fast(device))
    head_dtype = torch.bfloat16 if bf16_head else None

    def evaluate() -> float:
        model.eval()
        track_load(moes, False)
        batches = (b for i, b in zip(range(cfg.eval_batches), heldout.eval_batches()))
        loss, _ = heldout_loss(model, batches, device, autocast, cfg.doc_mask)
        model.train()
        return loss

    bar = tqdm(total=cfg.max_steps, initial=start, desc="pretrain", unit="step", disable=not (cfg.progress and dp.is_main))
    summary: dict = {"start_step": start}
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * dp.world
    end = min(cfg.max_steps, start + cfg.stop_after) if cfg.stop_after else cfg.max_steps
    model.train()
    for step in range(start, end):
        t0 = time.perf_counter()
        lam = piecewise(cfg.mtp_lambda, step)
        track_load(moes, True)
        sums = {"loss": 0.0, "main": 0.0, "mtp": 0.0, "seq_aux": 0.0, "index": 0.0}
        for micro in range(cfg.grad_accum):
            batch = [t.to(device) for t in data.batch(step * cfg.grad_accum + micro)]
            with autocast():
                losses = pretrain_losses(model, batch, lam, cfg.seq_aux_alpha, moes, head_dtype, cfg.doc_mask)
            (losses.total / cfg.grad_accum).backward()
            for key, value in zip(sums, losses):
                sums[key] += float(value.detach()) / cfg.grad_accum if value is not None else 0.0
        data.step = (step + 1) * cfg.grad_accum
        dp.average_gradients(model)
        dp.sum_expert_loads(moes)
        sums = dp.mean(sums)
        loads = load_stats(moes)
        counts = [m.expert_load.tolist() for m in moes]  # tokens per expert this step, before the bias update resets them
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
        update_bias(moes, cfg.bias_update_rate)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        track_load(moes, False)
        if not math.isfinite(sums["loss"]):
            raise FloatingPointError(f"loss became {sums['loss']} at step {step + 1}; lower lr or check the data.")
        dt = time.perf_counter() - t0
        done = step + 1
        row = {"step": done, "loss": sums["main"], "mtp_loss": sums["mtp"] if mtp_count(model) else None,
               "total_loss": sums["loss"], "lr": lr, "mtp_lambda": lam, "grad_norm": grad_norm,
               "tokens": done * tokens_per_step, "tokens_per_s": tokens_per_step / dt,
               "load_max_over_mean": loads, "expert_load": counts, "seq_aux": sums["seq_aux"] if cfg.seq_aux_alpha > 0 else None,
               "index_loss": sums["index"] if indexed else None}
        if dp.is_main and (done % cfg.eval_every == 0 or done == cfg.max_steps):
            row["heldout_loss"] = evaluate()
            summary["heldout_loss"] = row["heldout_loss"]
        if log is not None and (done % cfg.log_every == 0 or "heldout_loss" in row or done == cfg.max_steps):
            log.write(row)
        summary.update(step=done, loss=sums["main"], mtp_loss=row["mtp_loss"], load_max_over_mean=loads)
        bar.update(1)
        bar.set_postfix(loss=f"{sums['main']:.3f}", mtp=f"{sums['mtp']:.3f}", lr=f"{lr:.2e}",
                        tok_s=f"{row['tokens_per_s']:.0f}", load=f"{max(loads, default=1.0):.2f}")
        if dp.is_main and (done % cfg.ckpt_every == 0 or done == end):
            save_checkpoint(out, done, model, optimizer, scheduler, data.state_dict(), mc.to_dict(), cfg.keep_checkpoints)
        if dp.is_main and cfg.export_every and done % cfg.export_every == 0 and done < cfg.max_steps:
            save_final(cpu_copy(model), cfg, out, tokenizer_dir, name=f"step-{done}")
    bar.close()
    dp.barrier()
    if not dp.is_main:
        dp.close()
        return {**summary, "final": None, "checkpoint": None}
    summary["checkpoint"] = str(latest_checkpoint(out)) if latest_checkpoint(out) else None
    if end < cfg.max_steps:  # a piece of a longer run: the next invocation resumes
        dp.close()
        return {**summary, "final": None}
    if "heldout_loss" not in summary:
        summary["heldout_loss"] = evaluate()
    summary["final"] = str(save_final(model, cfg, out, tokenizer_dir))
    from dsv3.train.plots import save_plots
    summary["plots"] = [str(p) for p in save_plots(log.rows, out)]
    dp.close()
    return summary


def mix_shards(path: str, manifest: dict) -> TokenShards:
    """The train split of a `mix` source, which must share the main data's tokenizer."""
    other = load_manifest(path)
    if other["tokenizer"]["sha256"] != manifest["tokenizer"]["sha256"]:
        raise DataError(f"mix source {path} was tokenized with another tokenizer than `data` ({other['tokenizer']['path']}).")
    return TokenShards(path, "train")


def init_weights_from(model: CausalLM, model_dir: str) -> None:
    """Start from the weights (router biases and MTP modules included) of an HF-layout model directory."""
    from dsv3.io.load import load_model
    from dsv3.errors import CheckpointError

    src = load_model(model_dir, dtype=torch.float32, with_mtp=bool(model.num_mtp_layers), progress=False)
    theirs, ours = src.state_dict(), model.state_dict()
    wrong = [n for n, t in theirs.items() if n in ours and t.shape != ours[n].shape]
    if wrong:
        raise CheckpointError(f"init_from {model_dir}: {wrong[0]} has shape {list(theirs[wrong[0]].shape)}, the model's is "
                              f"{list(ours[wrong[0]].shape)}; `model:` may only change what leaves the weights' shapes alone.")
    missing, unexpected = model.load_state_dict(theirs, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"init_from {model_dir} does not fit the model: "
                              f"missing {', '.join(missing[:3]) or 'nothing'}; unexpected {', '.join(unexpected[:3]) or 'nothing'}.")


def mtp_count(model: CausalLM) -> int:
    return model.num_mtp_layers


def cpu_copy(model: CausalLM) -> CausalLM:
    """The weights as they are now in a model of their own on the CPU, built on the meta device (no second copy on
    the training device), for `export_every`: saving moves and casts the model it is given."""
    with torch.device("meta"):
        snap = type(model)(copy.deepcopy(model.config), with_mtp=bool(model.num_mtp_layers))
    snap.to_empty(device="cpu")
    snap.tie_weights()
    snap.reset_buffers()
    with torch.no_grad():
        snap.load_state_dict({k: v.detach() for k, v in model.state_dict().items()})  # copies, onto the CPU
    return snap.eval()


def save_final(model: CausalLM, cfg: PretrainConfig, out: Path, tokenizer_dir: str, name: str = "final") -> Path:
    """`OUT/final` (or `OUT/<name>`): an HF-layout model directory (with tokenizer and the training config) for
    `dsv3 generate` and the evals."""
    model = model.to("cpu")
    if cfg.save_dtype == "bfloat16":
        model = model.cast(torch.bfloat16)
    model.config.torch_dtype = cfg.save_dtype
    model.config.extra[TRAINED_KEY] = cfg.seq_len  # what `dsv3.models.context_length` warns past (config.json `training_seq_len`)
    final = save_model(model, out / name, tokenizer_from=tokenizer_dir)
    (final / "pretrain.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return final
