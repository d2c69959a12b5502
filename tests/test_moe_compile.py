"""The routed experts' grouped matmul as an opaque custom op: same values and gradients as
F.grouped_mm, and a model that torch.compile can trace in fp32 on CPU (the op's own fake-tensor
rule accepts only bf16)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv3.config import ModelConfig
from dsv3.models.deepseek_v3 import DeepseekV3ForCausalLM
from dsv3.layers.grouped import _grouped_mm
from tiny_model import TINY


def test_custom_op_matches_grouped_mm_values_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(3, 8, 12, requires_grad=True)
    offs = torch.tensor([3, 3, 10], dtype=torch.int32)  # the middle group is empty
    g = torch.randn(10, 12)
    ours = _grouped_mm(x, w, offs)
    ours.backward(g)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = F.grouped_mm(x, w, offs=offs)
    ref.backward(g)
    assert torch.equal(ours, ref) and torch.equal(gx, x.grad) and torch.equal(gw, w.grad)
    assert gw[1].abs().max() == 0 and gw[0].abs().max() > 0


@pytest.mark.slow
def test_compiled_model_forward_and_backward_equal_eager():
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({**TINY, "vocab_size": 64, "torch_dtype": "float32"})
    model = DeepseekV3ForCausalLM(cfg)
    model.init_weights(std=0.2)
    ids = torch.randint(0, 64, (2, 16))
    eager = model(ids)
    eager.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    compiled = torch.compile(model)(ids)
    compiled.square().mean().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-3, atol=1e-6, msg=n)
