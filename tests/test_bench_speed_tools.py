"""bench/long_model_goals.py's speed medians and bench/index_topk.py's side-by-side run (issue 25)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_speed_figures_are_medians_over_the_runs_that_finished():
    from long_model_goals import _median_run

    runs = [{"length": 1024, "prefill_s": 0.2, "decode_ms": 12.0, "peak_rss_gb": 0.5},
            {"error": "killed"},
            {"length": 1024, "prefill_s": 0.1, "decode_ms": 7.0, "peak_rss_gb": 0.7},
            {"length": 1024, "prefill_s": 0.4, "decode_ms": 9.0, "peak_rss_gb": 0.4}]
    m = _median_run(runs)
    assert (m["prefill_s"], m["decode_ms"], m["peak_rss_gb"], m["repeats"]) == (0.2, 9.0, 0.7, 3)
    assert m["prefill_tok_s"] == pytest.approx(1024 / 0.2)
    assert _median_run([{"error": "killed"}]) == {"error": "killed"}


def test_index_topk_bench_runs_the_three_side_by_side_and_agrees(tmp_path, capsys):
    from dsv3 import kernels

    if not kernels.load():
        pytest.skip("no native library (no C compiler)")
    from index_topk import main

    assert main(["--sizes", "300,2000", "--released-sizes", "", "--threads", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert [(r["T"], r["S"]) for r in res["rows"]] == [(256, 300), (1, 300), (256, 2000), (1, 2000)]
    assert all(r["same_set_share"] == 1.0 and r["transformers_s"] > 0 and r["gflops"] > 0 for r in res["rows"])
    assert (tmp_path / "index_topk.png").stat().st_size > 0
    assert "torch's fp32 GEMM (2048^3) on 1 threads" in capsys.readouterr().out
    assert res["fma_peak_gflops"] > 0 and res["fma_peak"].startswith("1 x ")


def test_hc_sinkhorn_bench_runs_both_paths_and_they_agree(tmp_path, capsys):
    from dsv3 import kernels

    if not kernels.load():
        pytest.skip("no native library (no C compiler)")
    from hc_sinkhorn import main

    assert main(["--rows", "1,5", "--streams", "2", "--threads", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["n"], r["rows"]) for r in rows] == [(2, 1), (2, 5)]
    assert all(r["agree"] and r["native_s"] > 0 and r["pytorch_s"] > 0 for r in rows)
    assert "DIFFER" not in capsys.readouterr().out
