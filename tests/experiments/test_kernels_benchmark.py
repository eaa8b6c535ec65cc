"""Smoke test of experiments/benchmarks/kernels.py: the quick mode runs and writes its JSON.

On CPU the kernels run in interpret mode, so only the structure and the arithmetic of the report
are checked, never the speed.
"""

import importlib.util
import json
import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "benchmarks"

pytestmark = pytest.mark.usefixtures("jax_compile_cache")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("_benchmark_kernels", BENCHMARKS / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels") / "kernels.json"
    report = bench.main(["--quick", "--repeats", "1", "--out", str(out)])
    return report, json.loads(out.read_text())


def test_json_matches_the_report(quick_run):
    report, written = quick_run
    assert written == json.loads(json.dumps(report))
    for key in ("date", "device_kind", "backend", "jax_version", "settings", "notes"):
        assert key in written
    assert written["settings"]["mode"] == "quick"
    if written["backend"] == "cpu":
        assert written["settings"]["pallas_interpret_mode"]
        assert any("NOT performance numbers" in note for note in written["notes"])


def test_roofs(quick_run):
    _, r = quick_run
    assert r["matmul_roof"]["tflops"] > 0 and r["copy_roof"]["gb_per_s"] > 0


def test_attention_rows(bench, quick_run):
    _, r = quick_run
    rows = r["attention"]
    assert {row["causal"] for row in rows} == {True, False}
    for row in rows:
        full = 4.0 * row["batch"] * row["num_heads"] * row["seq_len"] ** 2 * row["head_dim"]
        assert row["fwd_flops"] == (full / 2 if row["causal"] else full)  # causal counts half
        assert row["bwd_flops"] == 2.5 * row["fwd_flops"]
        for impl in ("pallas", "xla"):  # these two run everywhere
            for p in ("fwd", "bwd"):
                t = row[impl][p]
                assert t["seconds"] > 0 and t["tflops"] > 0
                assert t["tflops"] == pytest.approx(row[f"{p}_flops"] / t["seconds"] / 1e12)
                assert t["of_matmul"] == pytest.approx(t["tflops"] / r["matmul_roof"]["tflops"])
        cudnn = row["cudnn"]["fwd"]
        assert isinstance(cudnn, dict) or cudnn.startswith("n/a")
        if r["backend"] == "cpu":
            assert row["fwd_pallas_over_cudnn"] is None


def test_decode_and_quant_matmul_rows(quick_run):
    _, r = quick_run
    assert {row["kv_dtype"] for row in r["decode_attention"]} == {"bfloat16", "int8"}
    for row in r["decode_attention"]:
        for impl in ("pallas", "xla_reference"):
            assert row[impl]["gb_per_s"] == pytest.approx(row["bytes"] / row[impl]["seconds"] / 1e9)
    rows = r["quant_matmul"]
    assert [row["M"] for row in rows[:3]] == [1, 16, 64]
    assert [row["kind"] for row in rows] == ["decode"] * 3 + ["prefill"]
    for row in rows:
        assert (
            row["int4"]["weight_bytes"] < row["int8"]["weight_bytes"] < row["bf16"]["weight_bytes"]
        )
        for name in ("int8", "int4"):
            speedup = row["bf16"]["seconds"] / row[name]["seconds"]
            assert row[f"{name}_speedup_over_bf16"] == pytest.approx(speedup)
            assert row[name]["of_copy"] == pytest.approx(
                row[name]["gb_per_s"] / r["copy_roof"]["gb_per_s"]
            )


def test_table(bench, quick_run):
    report, _ = quick_run
    table = bench.format_tables(report)
    for heading in ("Roofs:", "Attention TFLOP/s", "Decode attention GB/s", "Quantized matmul"):
        assert heading in table
    if report["backend"] == "cpu":
        assert "NOT performance numbers" in table


def test_sections_flag(bench):
    args = bench.parse_args(["--sections", "decode,matmul"])
    assert args.sections == ("decode", "matmul")
    with pytest.raises(SystemExit):
        bench.parse_args(["--sections", "attn"])
