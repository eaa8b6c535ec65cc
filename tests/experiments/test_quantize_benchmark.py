"""Smoke test of experiments/benchmarks/quantize.py: the quick mode runs and writes its JSON.

The quick mode evaluates a tiny random model on random tokens, so only the structure of the
report and the relations between rows (sizes shrink, quantization moves perplexity a little)
are checked.
"""

import importlib.util
import json
import math
import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "benchmarks"

pytestmark = pytest.mark.usefixtures("jax_compile_cache")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("_benchmark_quantize", BENCHMARKS / "quantize.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("quantize") / "quantize.json"
    report = module.main(["--quick", "--variants", "fp32,bf16,int4-g32", "--out", str(out)])
    return module, report, json.loads(out.read_text())


def test_json_matches_the_report(quick_run):
    _, report, written = quick_run
    assert written == json.loads(json.dumps(report))
    for key in ("date", "device_kind", "backend", "jax_version", "settings", "rows", "notes"):
        assert key in written
    assert written["settings"]["mode"] == "quick"


def test_rows(quick_run):
    module, _, written = quick_run
    rows = {r["variant"]: r for r in written["rows"]}
    assert list(rows) == ["fp32", "bf16", "int4-g32"]
    # A random model over 256 tokens: perplexity near the vocabulary size, and quantization
    # changes it by little.
    assert 50 < rows["fp32"]["perplexity"] < 1000
    for name in ("bf16", "int4-g32"):
        assert math.isclose(rows[name]["perplexity"], rows["fp32"]["perplexity"], rel_tol=0.05)
    proj = {name: r["projections_mb"] for name, r in rows.items()}
    assert proj["bf16"] == pytest.approx(proj["fp32"] / 2)
    assert proj["int4-g32"] < 0.2 * proj["fp32"]  # 4 bits + f32 scale and offset per 32: 6
    assert rows["fp32"]["group_sizes"] == [] and rows["int4-g32"]["group_sizes"] == [32]
    table = module.format_table(written)
    assert table.count("\n") == 1 + len(rows) and "| int4-g32 |" in table
