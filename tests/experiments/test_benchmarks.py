"""Tests for experiments/benchmarks/: train_throughput.py on a tiny config, and the nanoGPT peer."""

import importlib.util
import json
import pathlib
import py_compile
import subprocess
import sys

import numpy as np
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "benchmarks"
RUNLOCAL = "experiments/shakespeare_char.py:runlocal"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["train_throughput", "nanogpt_peer"])
def test_scripts_compile(name, tmp_path):
    py_compile.compile(str(BENCHMARKS / f"{name}.py"), cfile=str(tmp_path / "x.pyc"), doraise=True)


@pytest.mark.slow
def test_train_throughput_runlocal(shakespeare_corpus, tmp_path):
    """The whole benchmark (step timing, end-to-end run, table, JSON) on :runlocal, no peer."""
    bench = _load_script("train_throughput")
    args = bench.parse_args(
        ["--steps", "3", "--timed-steps", "2", "--repeats", "1"]
        + ["--config", RUNLOCAL, "--e2e-config", RUNLOCAL]
    )
    report = bench.run_benchmark(args)

    # The two specs are the same config, timed once: on one device using every core and, on a
    # CPU host with several cores, on one single-threaded device per core.
    steps = report["steps"]
    assert [s["devices"] for s in steps] == sorted({1, bench.cpu_device_count(-1, (4,))})
    for step in steps:
        assert step["compile_s"] > 0 and step["step_time_ms"] > 0 and step["timed_steps"] == 2
        assert np.isfinite(step["loss"])
        if report["backend"] == "cpu":
            assert 0 < step["mfu"] < 1.5  # relative to a measured matmul: may exceed 1 a little
    if report["backend"] == "cpu":
        assert report["gpt2_124m"].startswith("skipped")
    ours = report["end_to_end"]["ours"]  # `python -m train` in a fresh process
    assert ours["steps"] == 3 and np.isfinite(ours["val_loss"]) and ours["devices"] == 1
    assert ours["total_time_s"] == ours["wall_s"] > ours["train_time_s"] > 0
    assert ours["other_cpu_s"] >= 0 and ours["cpu_s"] > 0
    assert [run["order"] for run in report["end_to_end"]["runs"]] == [["ours"]]
    assert report["end_to_end"]["peer"].startswith("skipped")

    table = bench.format_tables(report)
    assert "| train step |" in table and "ours (JAX, 1 device(s))" in table
    out = tmp_path / "result.json"
    bench.write_json(report, out)
    assert json.loads(out.read_text())["end_to_end"]["steps"] == 3


def test_nanogpt_peer_runs(tmp_path):
    """Three steps of the PyTorch peer on random ids; prints one JSON line."""
    pytest.importorskip("torch", reason="the peer needs torch, which the project never depends on")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "train.npy", rng.integers(0, 20, 4000).astype(np.uint16))
    np.save(tmp_path / "val.npy", rng.integers(0, 20, 1000).astype(np.int32))
    cmd = [
        sys.executable, str(BENCHMARKS / "nanogpt_peer.py"),
        "--train", str(tmp_path / "train.npy"), "--val", str(tmp_path / "val.npy"),
        "--steps", "3", "--warmup", "1", "--eval-every", "2", "--eval-batches", "2",
        "--batch-size", "4", "--block-size", "16", "--num-layers", "2", "--embed-dim", "32",
        "--threads", "1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"] == 3 and result["threads"] == 1
    assert result["eval_tokens"] == 2 * 4 * 16
    assert 0 < result["val_loss"] < 10 and result["train_time_s"] <= result["total_time_s"]


@pytest.mark.slow
def test_finetune_benchmark_on_a_tiny_chat_model(tmp_path):
    """Full fine-tuning vs LoRA on a tiny chat model: fractions, memory and times are recorded."""
    from models import hf
    from train import sft

    sys.path.insert(0, str(BENCHMARKS.parents[1] / "tests" / "infer"))
    from tiny_lm import tiny_lm

    lm = tiny_lm()
    hf.save_hf_dir(lm.model, tmp_path / "model", tokenizer=lm.tokenizer)
    chat = [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Him."}]
    sft.write_chat_jsonl(tmp_path / "chats.jsonl", [chat] * 8)
    overrides = [f"init_from={tmp_path / 'model'}", f"data.source={tmp_path / 'chats.jsonl'}"]
    overrides += [f"data.val_source={tmp_path / 'chats.jsonl'}", "data.seq_len=64"]
    overrides += ["data.batch_size=2"]
    bench = _load_script("finetune")
    argv = ["--modes", "full,lora", "--steps", "3", "--out", str(tmp_path / "out.json")]
    report = bench.main(argv + [f"--set={o}" for o in overrides])
    full, lora = report["results"]
    assert full["trained_params"] == full["params"] == lm.model.cfg.num_params()
    # LoRA trains only its adapters: the base's count plus theirs.
    assert 0 < lora["trained_params"] == lora["params"] - lm.model.cfg.num_params()
    assert all(r["step_time_s"] > 0 and r["peak_rss_mb"] > 0 for r in (full, lora))
    assert json.loads((tmp_path / "out.json").read_text())["results"] == report["results"]
