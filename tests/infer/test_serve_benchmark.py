"""experiments/benchmarks/serve.py on the tiny model: both modes run and the report adds up."""

import importlib.util
import pathlib

import pytest
from tiny_lm import tiny_lm

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "benchmarks" / "serve.py"

pytestmark = pytest.mark.usefixtures("jax_compile_cache")


def test_serve_benchmark_smoke():
    spec = importlib.util.spec_from_file_location("_benchmark_serve", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    load = bench.make_load(5, 300, 12, (2, 6), seed=0)
    assert load == bench.make_load(5, 300, 12, (2, 6), seed=0)  # a fixed seed, a fixed load
    assert all(len(p) == 12 and 2 <= m <= 6 for p, m in load)
    results = bench.run_benchmark(
        tiny_lm(), "tiny", concurrency=(1, 4), requests=4, prompt_tokens=12, token_range=(2, 6)
    )
    assert [row["concurrency"] for row in results["levels"]] == [1, 4]
    for row in results["levels"]:
        for mode in ("continuous", "static"):
            s = row[mode]
            assert s["requests"] == 4 and 0 < s["ttft_p50_s"] <= s["ttft_p99_s"]
            assert s["output_tokens"] > 0 and s["output_tokens_per_s"] > 0
        assert row["ratios"]["requests_per_s"] == pytest.approx(
            row["continuous"]["requests_per_s"] / row["static"]["requests_per_s"]
        )
    assert "continuous / static" in bench.table(results)
