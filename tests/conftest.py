import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (hf_oracle, tiny_model, ...) import by name
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """(model, tokenizer) of a tiny random DeepSeek-V3 model in fp32, one per test module."""
    from dsv3.io.load import load_model
    from dsv3.io.tokenizer import Tokenizer
    from tiny_model import make_tiny_model_dir

    d = make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    return load_model(d, dtype="fp32", progress=False), Tokenizer.from_dir(d)
