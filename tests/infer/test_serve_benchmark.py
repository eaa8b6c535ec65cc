"""experiments/benchmarks/serve.py on the tiny model: the server runs as its own process, both
modes run at every level and the report adds up."""

import importlib.util
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "benchmarks" / "serve.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("_benchmark_serve", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_load_is_fixed_by_its_seed():
    bench = _load_script()
    load = bench.make_load(5, 300, 12, (2, 6), seed=0)
    assert load == bench.make_load(5, 300, 12, (2, 6), seed=0)
    assert load != bench.make_load(5, 300, 12, (2, 6), seed=1)
    warm = bench.make_load(5, 300, 12, (2, 6), seed=0, ids_seed=1)  # same lengths, other ids
    assert [m for _, m in warm] == [m for _, m in load]
    assert all(a != b for (a, _), (b, _) in zip(warm, load, strict=True))
    assert all(len(p) == 12 and 2 <= m <= 6 for p, m in load)


@pytest.mark.slow
def test_serve_benchmark_smoke():
    bench = _load_script()
    args = bench.parse_args(
        ["--tiny", "--concurrency", "1", "4", "--requests", "4", "--prompt-tokens", "12",
         "--min-tokens", "2", "--max-tokens", "6"]
    )  # fmt: skip
    results = bench.run_benchmark(args)
    assert [row["concurrency"] for row in results["levels"]] == [1, 4]
    for row in results["levels"]:
        for mode in ("continuous", "static"):
            s = row[mode]
            assert s["requests"] == 4 and 0 < s["ttft_p50_s"] <= s["ttft_p99_s"]
            # ignore_eos: every request makes exactly its max_tokens
            assert s["output_tokens"] == sum(m for _, m in bench.make_load(4, 300, 12, (2, 6), 0))
        assert row["ratios"]["continuous_over_static"]["requests_per_s"] == pytest.approx(
            row["continuous"]["requests_per_s"] / row["static"]["requests_per_s"]
        )
        assert "llama_cpp" not in row
    assert "ours, static waves" in bench.table(results)
