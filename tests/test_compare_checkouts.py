"""bench/compare_checkouts.py: which direction is "worse" for a figure, read from its last label (its unit)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from compare_checkouts import flatten, lower_is_better  # noqa: E402


@pytest.mark.parametrize("key, lower", [
    ("engine_bench | throughput, 64 requests | dsv3 | tok/s", False),  # a rate, although it ends in "s"
    ("engine_bench | TTFT speed-up from the prefix cache | dsv3 | x", False),  # "TTFT s..." is not seconds
    ("engine_bench | TTFT, 1,016 tokens, cold | dsv3 | ms", True),
    ("engine_bench | cache bytes per token (fp32) | dsv3 MLA latent | B", True),
    ("results | int8 | peak_rss", True),
    ("results | int8 | quantize_s", True),
    ("results | AWQ int4 g128 | ppl_ratio", True),
    ("results | int8 | decode_b1", False),
    ("results | int8 | top1", False),
    ("results | fim | long | infill_latency | latency_s | p50", True),  # a statistic: the unit is the label before
    ("results | fim | long | infill_latency | prompt_tokens", False),
    ("results | speed | long | 1024 | prefill_tok_s", False),  # a rate written with an underscore
])
def test_lower_is_better_reads_the_unit(key, lower):
    assert lower_is_better(key) is lower


def test_rows_are_named_by_their_string_fields():
    got = flatten({"results": [{"scheme": "int8", "ppl": 1.5, "run": "x"}, {"scheme": "fp8", "ppl": 2.0}]})
    assert got == {"results | int8 | x | ppl": 1.5, "results | fp8 | ppl": 2.0}
