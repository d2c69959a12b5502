import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (hf_oracle, tiny_model, ...) import by name
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
