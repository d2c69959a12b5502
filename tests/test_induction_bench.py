"""bench/induction.py: the from-scratch copying test that separates V4's attention block from V3's (issue 25)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_both_models_train_on_repeated_random_tokens_and_the_json_matches_the_print(tmp_path, capsys):
    from induction import VOCAB, main

    assert main(["--models", "v3,v4-random,v4:8", "--steps", "4", "--threads", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    printed = capsys.readouterr().out
    assert [(r["model"], r["step"]) for r in rows] == [("v3", 4), ("v4-random", 4), ("v4:8", 4)]
    for r in rows:
        # four steps from N(0, 0.02) weights: both halves still near a uniform guess over the 8,192-token vocabulary,
        # above the ln 256 a model that learned the token range would reach
        assert math.log(VOCAB) < r["first_half"] < math.log(8192) + 0.5
        assert f"second half {r['second_half']:.2f} nats/token" in printed
    assert (tmp_path / "induction.png").stat().st_size > 0


def test_a_v4_gain_starts_the_key_value_norms_there():
    from induction import tiny

    for gain in (1.0, 8.0):
        norms = [layer.attn.kv_norm.weight for layer in tiny("v4", "training", gain).model.layers]
        assert all(bool((w == gain).all()) for w in norms)


def test_a_rope_suffix_rotates_that_many_values_of_every_head():
    from induction import parse_model, tiny

    assert parse_model("v4:8/r64") == ("v4", "training", 8.0, 64)
    model = tiny("v4", "training", 8.0, rope=64)
    assert model.config.qk_rope_head_dim == 64
    assert tiny("v4", "training", 8.0).config.qk_rope_head_dim == 16  # the embedded model's own
    # the same token at positions 0 and 5: with all 64 values rotated its two keys differ in the first 48 too
    x = torch.randn(1, 1, model.config.hidden_size).expand(1, 6, -1).contiguous()
    for m, changed in ((model, True), (tiny("v4", "training", 8.0), False)):
        cos, sin = m._rope(torch.arange(6)[None]).main
        _, _, kv = m.model.layers[0].attn._qkv(x, cos, sin)
        assert torch.allclose(kv[0, 0, :48], kv[0, 5, :48]) is not changed
        assert not torch.allclose(kv[0, 0, 48:], kv[0, 5, 48:])


@pytest.mark.parametrize("name", ["v5", "v4:0", "v4:x", "v4:8/r0", "v4:8/r3", "v4:8/r128", "v4:8/rx"])
def test_an_unknown_model_is_refused_with_one_line(capsys, name):
    from induction import main

    with pytest.raises(SystemExit) as e:
        main(["--models", name])
    assert e.value.code == 2 and f"unknown model {name!r}" in capsys.readouterr().err
