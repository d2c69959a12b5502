"""README's Python example runs as written on a DeepSeek-V2-Lite-shaped model (deepseek_v2, no MTP layer).

It used to ask for `num_speculative_tokens=1`, which V2-Lite cannot honour: it has no MTP layer to draft with.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dsv3.errors import DSV3Error

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return next(b for b in blocks if "DeepSeek-V2-Lite" in b)


def test_readme_python_example_runs_on_a_v2_lite_shaped_model(tmp_path, capsys):
    import torch

    from dsv3.config import ModelConfig
    from dsv3.io.checkpoint import save_model
    from dsv3.models.deepseek_v3 import DeepseekV3ForCausalLM
    from dsv3.io.tokenizer import Tokenizer
    from tiny_model import TINY
    from tiny_tokenizer import make_tiny_tokenizer

    make_tiny_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    cfg = ModelConfig.from_dict({**TINY, "model_type": "deepseek_v2", "topk_method": "greedy", "n_group": 1, "topk_group": 1,
                                 "num_nextn_predict_layers": 0, "q_lora_rank": None, "vocab_size": tok.vocab_size,
                                 "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id})
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg)
    model.init_weights()
    save_model(model, tmp_path)
    code = python_block().replace("path/to/DeepSeek-V2-Lite", str(tmp_path))
    exec(compile(code, str(README), "exec"), {})
    assert capsys.readouterr().out.count("\n") >= 2
    from dsv3 import LLM

    with pytest.raises(DSV3Error, match="MTP"):  # what the old example asked of it
        LLM(tmp_path, num_speculative_tokens=1)
