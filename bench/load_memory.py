"""Peak memory while loading a ~1 GB checkpoint, against the loaded model's own size.

    python bench/load_memory.py [--params-mb 1024] [--dtype fp32] [--keep DIR]

Writes a random DeepSeek-V3-shaped checkpoint (MLA, 1 dense + MoE layers) of about the requested
size, then loads it with `dsv3.io.load.load_model` in a fresh process and prints the peak RSS
increase during loading divided by the model's in-memory size (the target is <= 1.3), next to the
same figure for HF transformers' `from_pretrained` on the same files.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = r"""
import json, sys, torch
def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)
which, path = sys.argv[1], sys.argv[2]
if which == 'dsv3':
    from dsv3.io.load import load_model
    import dsv3.models.deepseek_v3
else:
    import transformers
before = rss('VmRSS:')
if which == 'dsv3':
    model = load_model(path, dtype=torch.float32, progress=False)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
peak = rss('VmHWM:')
size = sum(p.numel() * p.element_size() for p in model.state_dict().values() if p.device.type == 'cpu')
size -= model.lm_head.weight.nbytes if getattr(model.config, 'tie_word_embeddings', False) else 0
print(json.dumps({'before': before, 'peak': peak, 'model_bytes': size}))
"""


def make_checkpoint(out: Path, target_mb: int) -> None:
    from dsv3.io.checkpoint import save_model
    from dsv3.config import ModelConfig
    from dsv3.models.deepseek_v3 import DeepseekV3ForCausalLM

    per_layer = 32 * 3 * 1024 * 512 * 4  # 32 experts of width 512 at hidden 1024, fp32
    layers = max(2, round((target_mb * 2**20 - 2 * 32000 * 1024 * 4) / per_layer) + 1)
    cfg = ModelConfig.from_dict(dict(
        model_type="deepseek_v3", vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
        num_hidden_layers=layers, num_attention_heads=8, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1, n_group=4,
        topk_group=2, first_k_dense_replace=1, torch_dtype="float32"))
    model = DeepseekV3ForCausalLM(cfg)
    model.init_weights()
    save_model(model, out, max_shard_bytes=2 * 2**30)


def measure(which: str, path: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, which, str(path)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params-mb", type=int, default=1024)
    ap.add_argument("--keep", type=Path, default=None, help="write the checkpoint here and keep it")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers comparison")
    args = ap.parse_args()
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="dsv3-rss-"))
    if not (tmp / "config.json").exists():
        make_checkpoint(tmp, args.params_mb)
    rows = [("dsv3", measure("dsv3", tmp))] + ([] if args.no_hf else [("transformers", measure("hf", tmp))])
    print(f"{'loader':<14}{'model MB':>10}{'peak-before MB':>16}{'ratio':>8}")
    for name, m in rows:
        ratio = (m["peak"] - m["before"]) / m["model_bytes"]
        print(f"{name:<14}{m['model_bytes'] / 2**20:>10.0f}{(m['peak'] - m['before']) / 2**20:>16.0f}{ratio:>8.2f}")
    print(json.dumps({name: (m["peak"] - m["before"]) / m["model_bytes"] for name, m in rows}))
    if args.keep is None:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


if __name__ == "__main__":
    main()
