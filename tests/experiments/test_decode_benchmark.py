"""Tests for experiments/benchmarks/decode.py: its timing, report and table on a tiny random model.

The run against SmolLM2 and the peers (slow, data) needs a peer interpreter with torch,
transformers, gguf and llama-cpp-python, named by JAXLM_PEER_PYTHON.
"""

import importlib.util
import json
import os
import pathlib
import py_compile
import subprocess

import pytest
from flax import nnx

from models import Decoder, ModelConfig

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "benchmarks"
PEER_PYTHON = os.environ.get("JAXLM_PEER_PYTHON", "")
PROMPT = [3, 14, 15, 9, 26, 5, 35, 8]  # P = 8
NEW_TOKENS = 4

pytestmark = pytest.mark.usefixtures("jax_compile_cache")


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_script("decode")


@pytest.fixture(scope="module")
def tiny_model():
    cfg = ModelConfig(
        vocab_size=64,
        num_layers=2,
        embed_dim=32,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=64,
        max_seq_len=32,
        init_std=0.2,
    )
    return Decoder(cfg, rngs=nnx.Rngs(0))


def _args(bench, *extra):
    return bench.parse_args(
        ["--prompt-tokens", str(len(PROMPT)), "--new-tokens", str(NEW_TOKENS), "--repeats", "2"]
        + ["--model", "tiny-random", *extra]
    )


@pytest.fixture(scope="module")
def tiny_report(bench, tiny_model):
    """The whole benchmark on the tiny model, without peers."""
    return bench.run_benchmark(_args(bench), tiny_model, PROMPT, gguf=None, load_s=0.0)


@pytest.mark.parametrize("name", ["decode", "decode_peer"])
def test_scripts_compile(name, tmp_path):
    py_compile.compile(str(BENCHMARKS / f"{name}.py"), cfile=str(tmp_path / "x.pyc"), doraise=True)


def test_run_ours_times_prefill_and_decode(bench, tiny_model):
    r = bench.run_ours(tiny_model, PROMPT, NEW_TOKENS, repeats=2)
    assert len(r["prefill_s"]) == len(r["decode_s"]) == 2
    assert r["first_run_s"] >= r["first_prefill_s"] > 0
    assert r["prefill_tokens_per_s"] == pytest.approx(len(PROMPT) / r["prefill_s_median"])
    assert r["decode_tokens_per_s"] == pytest.approx((NEW_TOKENS - 1) / r["decode_s_median"])
    assert r["decode_ms_per_token"] > 0
    assert len(r["first_ids"]) == NEW_TOKENS and all(0 <= i < 64 for i in r["first_ids"])
    assert r["runs_agree"]  # greedy is deterministic


def test_run_ours_rejects_a_run_longer_than_the_context(bench, tiny_model):
    with pytest.raises(ValueError, match="max_seq_len=32"):
        bench.run_ours(tiny_model, PROMPT, 30, repeats=1)


def test_report_without_peers(bench, tiny_report, tmp_path):
    r = tiny_report
    for key in ("date", "cpu", "cpu_count", "backend", "jax_version", "load_avg_1m_at_end"):
        assert key in r
    s = r["settings"]
    assert (s["prompt_tokens"], s["new_tokens"], s["repeats"]) == (len(PROMPT), NEW_TOKENS, 2)
    assert s["prompt_ids"] == PROMPT and s["model"] == "tiny-random"
    assert r["ours"]["prefill_tokens_per_s"] > 0 and r["ours"]["decode_tokens_per_s"] > 0
    assert r["peers"] == {
        "hf": "not run: no --peer-python",
        "llama.cpp": "not run: no --peer-python",
    }
    assert r["ratios"] == {} and r["greedy_check"] == {}

    table = bench.format_tables(r)
    assert "| ours (JAX) | fp32 |" in table and "not run: no --peer-python" in table
    assert "tokens/s ratio" not in table
    out = tmp_path / "decode.json"
    bench.write_json(r, out)
    assert json.loads(out.read_text())["ours"]["first_ids"] == r["ours"]["first_ids"]


def test_peers_need_a_gguf_file(bench, tiny_model):
    args = _args(bench, "--peer-python", "/no/such/python", "--repeats", "1")
    report = bench.run_benchmark(args, tiny_model, PROMPT, gguf=None)
    assert set(report["peers"].values()) == {"not run: the model is not a GGUF file"}


def test_ratios_both_ways_and_the_greedy_check(bench, tiny_report):
    report = json.loads(json.dumps(tiny_report))  # a copy
    ours = report["ours"]
    hf = {
        **ours,
        "engine": "hf",
        "threads": 2,
        "prefill_tokens_per_s": 2 * ours["prefill_tokens_per_s"],
        "decode_tokens_per_s": 0.5 * ours["decode_tokens_per_s"],
    }
    differs = [i + 1 for i in ours["first_ids"][2:]]  # equal on the first two ids only
    report["peers"] = {"hf": hf, "llama.cpp": {**hf, "first_ids": ours["first_ids"][:2] + differs}}
    bench.compare(report)

    ratios = report["ratios"]["hf"]
    assert ratios["prefill_peer_over_ours"] == pytest.approx(2.0)
    assert ratios["prefill_ours_over_peer"] == pytest.approx(0.5)
    assert ratios["decode_peer_over_ours"] == pytest.approx(0.5)
    assert ratios["decode_ours_over_peer"] == pytest.approx(2.0)
    check = report["greedy_check"]
    assert check["ours_vs_hf"] == {"matching_prefix": NEW_TOKENS, "of": NEW_TOKENS, "agree": True}
    assert check["ours_vs_llama.cpp"]["matching_prefix"] == 2
    assert not check["ours_vs_llama.cpp"]["agree"]

    table = bench.format_tables(report)
    assert "| HF transformers / ours (> 1: HF transformers faster) | 2.00 | 0.50 |" in table
    assert "| ours / HF transformers (> 1: ours faster) | 0.50 | 2.00 |" in table
    assert f"ours and HF agree on the first {NEW_TOKENS} of {NEW_TOKENS} ids" in table
    assert f"| 2/{NEW_TOKENS} equal |" in table


def _peer_python_or_skip() -> str:
    if not os.access(PEER_PYTHON, os.X_OK):
        pytest.skip(f"no peer interpreter at {PEER_PYTHON} (set JAXLM_PEER_PYTHON)")
    probe = subprocess.run(
        [PEER_PYTHON, "-c", "import torch, transformers, gguf, llama_cpp"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode:
        pytest.skip(f"{PEER_PYTHON} lacks a peer package: {probe.stderr.strip()[-200:]}")
    return PEER_PYTHON


@pytest.mark.slow
@pytest.mark.data
def test_smollm2_against_hf_and_llama_cpp(bench, tmp_path):
    """The real benchmark at tiny counts: both peers run, and ours and HF pick the same ids."""
    from models import hub

    python = _peer_python_or_skip()
    out = tmp_path / "decode.json"
    argv = ["--prompt-tokens", "16", "--new-tokens", "6", "--repeats", "1"]
    try:
        report = bench.main([*argv, "--peer-python", python, "--out", str(out)])
    except hub.PackageUnavailable as e:
        pytest.skip(f"SmolLM2 weights unavailable: {e}")
    assert json.loads(out.read_text())["settings"]["gguf"].endswith(".gguf")
    for engine in ("hf", "llama.cpp"):
        peer = report["peers"][engine]
        assert isinstance(peer, dict), peer
        assert peer["prefill_tokens_per_s"] > 0 and peer["decode_tokens_per_s"] > 0
        assert peer["threads"] == os.cpu_count() and peer["runs_agree"]
        assert len(peer["first_ids"]) == 6
    assert report["peers"]["hf"]["dtype"] == "torch.float32"
    assert report["greedy_check"]["ours_vs_hf"]["agree"]  # same fp32 weights, same ids
    assert set(report["ratios"]) == {"hf", "llama.cpp"}
