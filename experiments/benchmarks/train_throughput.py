"""Training speed: our train step on the main job, and baby GPT end to end against nanoGPT.

Run from the repository root, on an otherwise idle machine:
  python experiments/benchmarks/train_throughput.py --peer-python PYTHON_WITH_TORCH
(any interpreter with torch and numpy, e.g. a separate venv with `pip install torch numpy`;
torch is never a dependency of this project)
Quick check: add `--steps 60 --repeats 1`. Without --peer-python the PyTorch peer
(nanogpt_peer.py) is skipped.

Measures (a) the jitted train step of experiments/shakespeare_char.py (and its :baby variant when
that differs): compile time, median step time, tokens/s, MFU, each in a fresh interpreter on one
CPU device using every core and, on a CPU host, on one single-threaded device per core
(parallel/cpu.py, what the configs use); (b) on a GPU, GPT-2 124M at bf16; (c) our whole :baby
training run, `python -m train` in a fresh process, and the peer's on the same token streams,
`--repeats` times each, interleaved and never at the same time, in alternating order. Wall times
run from process start to exit for both. Shared machines are noisy (a 2-core VM's timings drift by
tens of percent over minutes), so each run also records the CPU time the rest of the machine
used meanwhile (other_cpu_s) and the hypervisor's steal, and the summary is the median of the
per-pair ratios.
Prints markdown tables; writes JSON to --out and to train_throughput.json beside this script.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `python experiments/benchmarks/...` from a checkout

from models.config import preset  # noqa: E402
from parallel.cpu import (  # noqa: E402
    available_cores,
    cpu_device_count,
    one_at_a_time,
    use_cpu_cores,
)
from train import trainer  # noqa: E402
from train.config_lib import load_config_script  # noqa: E402
from train.corpus import load_corpus  # noqa: E402
from train.input_pipeline import build_datasets  # noqa: E402
from train.optimizer import make_optimizer  # noqa: E402
from train.tokenizers import load_tokenizer  # noqa: E402

PEER_SCRIPT = pathlib.Path(__file__).with_name("nanogpt_peer.py")
LATEST_JSON = pathlib.Path(__file__).with_name("train_throughput.json")
MAIN_CONFIG = "experiments/shakespeare_char.py"
WARMUP_STEPS = 3  # run after compilation and before timing: first-touch allocations


def load_config(spec: str):
    """The locked config of `path[:arg]`, the path relative to the repository root."""
    return load_config_script(str(ROOT / spec))


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of an [n, n] @ [n, n] float32 matmul: the CPU's practical peak."""
    a, b = jax.random.normal(jax.random.key(0), (2, n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def build_step(model_cfg, config):
    """The trainer's jitted step and initial state, on one device or data parallel over all
    visible devices (the `dp` mesh `train_and_evaluate` builds).

    Returns:
      (step, state, place): step(state, placed_batch) -> (state, metrics); place(batch) puts a
      host batch where the step takes it.
    """
    optimizer, _ = make_optimizer(config.optimizer, config.train.num_steps)
    key = jax.random.key(config.train.seed + 1)
    dropout = model_cfg.dropout_rate > 0
    if jax.device_count() == 1:
        graphdef, state = trainer.init_train_state(model_cfg, optimizer, config.train.seed)
        step = trainer.make_train_step(
            graphdef, optimizer, config.train.z_loss, config.train.grad_accum_steps, dropout
        )
        return (lambda s, b: step(s, b, key)), state, jax.device_put
    from parallel.mesh import make_mesh
    from parallel.train import init_sharded_train_state, make_sharded_train_step, shard_batch

    mesh, rules = make_mesh(config.parallel.mesh), config.parallel.rules
    graphdef, state, shardings = init_sharded_train_state(
        model_cfg, optimizer, config.train.seed, mesh, rules
    )
    step = make_sharded_train_step(
        graphdef, optimizer, mesh, rules, shardings, z_loss=config.train.z_loss,
        grad_accum_steps=config.train.grad_accum_steps, dropout=dropout,
    )  # fmt: skip
    step = one_at_a_time(step) if jax.default_backend() == "cpu" else step
    return (lambda s, b: step(s, b, key)), state, (lambda b: shard_batch(b, mesh, rules))


def time_train_step(model_cfg, config, batches: list[dict], peak: float | None) -> dict:
    """Compiles the trainer's step (the first call, timed apart), warms up, then times each
    remaining batch.

    Args:
      model_cfg: the typed ModelConfig.
      config: the experiment config (optimizer, train and parallel sections, as the trainer).
      batches: {"inputs", "targets"}: int32 [B, T]; the first WARMUP_STEPS are not timed.
      peak: FLOP/s that MFU is relative to, or None for no MFU.

    Returns:
      compile_s, step_time_ms (median), tokens_per_s, mfu, num_params, tokens_per_step.
    """
    step, state, place = build_step(model_cfg, config)
    batches = [place(b) for b in batches]
    start = time.perf_counter()
    state, metrics = step(state, batches[0])  # compiles
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for i, batch in enumerate(batches[1:]):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - start)
    batch_size, seq_len = batches[0]["inputs"].shape
    step_time = statistics.median(times)
    flops = model_cfg.flops_per_token(seq_len) * batch_size * seq_len
    return {
        "devices": jax.device_count(),
        "num_params": model_cfg.num_params(),
        "tokens_per_step": batch_size * seq_len,
        "timed_steps": len(times),
        "compile_s": compile_s,
        "step_time_ms": 1e3 * step_time,
        "tokens_per_s": batch_size * seq_len / step_time,
        "mfu": flops / step_time / peak if peak else None,
        "loss": float(metrics["loss"]),
    }


def main_job_step(spec: str, timed_steps: int, peak: float | None) -> dict:
    """Times the train step of config `spec` on real batches from its input pipeline."""
    config = load_config(spec)
    with tempfile.TemporaryDirectory() as tmp:
        data = build_datasets(config.data, tmp)
        it = iter(data.train_ds)
        batches = [next(it) for _ in range(1 + WARMUP_STEPS + timed_steps)]
    model_cfg = trainer.model_config_from(config, data.tokenizer.vocab_size)
    return {"name": spec, **time_train_step(model_cfg, config, batches, peak)}


def step_in_subprocess(spec: str, cpu_devices: int, timed_steps: int, peak: float) -> dict:
    """main_job_step in a fresh interpreter whose CPU backend has `cpu_devices` devices (1: one
    device using every core); a process's device count is fixed once JAX has started."""
    cmd = [sys.executable, __file__, "--step-only", spec, f"--timed-steps={timed_steps}"]
    cmd += [f"--cpu-devices={cpu_devices}", f"--peak={peak}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"timing {spec} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gpt2_step(timed_steps: int, batch_size: int, peak: float | None) -> dict:
    """GPT-2 124M at bf16 compute, seq 1024, on random tokens (the step cost ignores the data)."""
    config = load_config(MAIN_CONFIG)  # optimizer and train settings
    model_cfg = preset("gpt2-124m", dtype="bfloat16")
    seq_len = model_cfg.max_seq_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(
        0, model_cfg.vocab_size, (1 + WARMUP_STEPS + timed_steps, batch_size, seq_len + 1)
    )
    batches = [
        {"inputs": t[:, :-1].astype(np.int32), "targets": t[:, 1:].astype(np.int32)} for t in tokens
    ]
    return {
        "name": f"gpt2-124m bf16, batch {batch_size}x{seq_len}",
        **time_train_step(model_cfg, config, batches, peak),
    }


def host_cpu_seconds() -> tuple[float, float]:
    """(busy, steal): CPU seconds this machine has spent busy, and lost to its hypervisor, since
    boot (/proc/stat; NaN elsewhere)."""
    try:
        fields = pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return float("nan"), float("nan")
    ticks = [int(f) for f in fields] + [0] * 8
    user, nice, system, idle, iowait, irq, softirq, steal = ticks[:8]
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


def timed_run(cmd: list[str], cwd: pathlib.Path | None = None) -> tuple[str, dict]:
    """Runs `cmd` to completion; returns its stdout and how long it took and what else ran.

    other_cpu_s is the CPU time the rest of the machine used meanwhile (busy time minus the
    command's own), steal_s the time the hypervisor took: either above a few seconds means the
    run competed for the cores and its timings are not clean.
    """

    def own() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    busy0, steal0, own0 = *host_cpu_seconds(), own()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd)
    wall = time.perf_counter() - start
    busy1, steal1, own1 = *host_cpu_seconds(), own()
    if proc.returncode:
        raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc.stdout, {
        "wall_s": wall,
        "cpu_s": own1 - own0,
        "other_cpu_s": max(0.0, (busy1 - busy0) - (own1 - own0)),
        "steal_s": steal1 - steal0,
    }


def run_ours(spec: str, steps: int, workdir: pathlib.Path) -> dict:
    """Our whole training run of `spec` for `steps` steps, as a user runs it:
    `python -m train --config SPEC --workdir DIR` in a fresh interpreter (imports included).

    The learning-rate schedule keeps the config's horizon, so a short run is the start of the
    full one. The final text sample is off (the peer does not sample); checkpoints stay on.
    """
    config = load_config(spec)
    horizon = config.optimizer.decay_steps or config.train.num_steps
    overrides = [
        f"train.num_steps={steps}",
        f"optimizer.decay_steps={horizon}",
        "train.progress_bar=false",
        "train.sample_tokens=0",
    ]
    cmd = [sys.executable, "-m", "train", "--config", spec, "--workdir", str(workdir)]
    stdout, timing = timed_run(cmd + [f"--config.{o}" for o in overrides], cwd=ROOT)
    devices = re.search(r"CPU: (\d+) single-threaded devices", stdout)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "step_time_s" in r]
    # Each log record averages the steps since the last log or eval; the first holds the compile.
    train_time, previous = 0.0, 0
    for r in logged:
        train_time += r["step_time_s"] * (r["step"] - previous)
        previous = r["step"]
    steady = [r["step_time_s"] for r in logged[1:]] or [logged[0]["step_time_s"]]
    model_cfg = json.loads((workdir / "model_config.json").read_text())
    return {
        "steps": max(r["step"] for r in records),
        "total_time_s": timing["wall_s"],
        "train_time_s": train_time,
        "step_time_ms": 1e3 * statistics.median(steady),
        "val_loss": [r["val_loss"] for r in records if "val_loss" in r][-1],
        "train_loss": [r["loss"] for r in records if "loss" in r][-1],
        "vocab_size": model_cfg["vocab_size"],
        "devices": int(devices.group(1)) if devices else 1,
        **timing,
    }


def token_stream(docs, tokenizer) -> np.ndarray:
    """The documents' ids concatenated as our pipeline packs them (eos after each, if any)."""
    parts = []
    for doc in docs:
        parts.append(np.asarray(tokenizer.encode(doc.text), np.int32))
        if tokenizer.eos_id is not None:
            parts.append(np.array([tokenizer.eos_id], np.int32))
    return np.concatenate(parts)


def peer_data(spec: str, ours_workdir: pathlib.Path, tmp: pathlib.Path) -> dict:
    """Writes our run's train/val token streams (its tokenizer's ids) for the peer; returns the
    peer's data flags."""
    config = load_config(spec)
    tokenizer = load_tokenizer(ours_workdir / "tokenizer")  # the very ids our run trained on
    corpus = load_corpus(config.data.source, config.data.val_names)
    np.save(tmp / "train.npy", token_stream(corpus.train, tokenizer))
    np.save(tmp / "val.npy", token_stream(corpus.val, tokenizer))
    vocab_size = json.loads((ours_workdir / "model_config.json").read_text())["vocab_size"]
    return {"train": tmp / "train.npy", "val": tmp / "val.npy", "vocab-size": vocab_size}


def run_peer(python: str, spec: str, steps: int, data_flags: dict) -> dict:
    """nanogpt_peer.py on our run's token streams (peer_data), with the same schedule and eval."""
    config = load_config(spec)
    m, d, opt = config.model, config.data, config.optimizer
    if (m.norm, m.mlp_activation, m.position, m.mlp_dim) != (
        "layernorm",
        "gelu",
        "learned",
        4 * m.embed_dim,
    ):
        raise ValueError(f"{spec} is not a GPT-2 shaped model; the nanoGPT peer cannot run it")
    if (opt.b1, opt.b2, opt.grad_clip, config.train.grad_accum_steps) != (0.9, 0.99, 1.0, 1):
        raise ValueError(
            f"{spec}: the peer hard-codes betas (0.9, 0.99), clip 1.0, no accumulation"
        )
    flags = {
        **data_flags,
        "steps": steps,
        "decay-steps": opt.decay_steps or config.train.num_steps,
        "warmup": opt.warmup_steps,
        "lr": opt.learning_rate,
        "min-lr": opt.min_learning_rate,
        "weight-decay": opt.weight_decay,
        "batch-size": d.batch_size,
        "block-size": d.seq_len,
        "num-layers": m.num_layers,
        "num-heads": m.num_heads,
        "embed-dim": m.embed_dim,
        "eval-every": config.train.eval_every,
        "eval-batches": d.eval_batches,
        "eval-batch-size": d.get("eval_batch_size") or d.batch_size,
    }
    cmd = [python, str(PEER_SCRIPT)] + [f"--{k}={v}" for k, v in flags.items()]
    stdout, timing = timed_run(cmd)
    peer = json.loads(stdout.strip().splitlines()[-1])
    peer["in_process_time_s"] = peer.pop("total_time_s")  # from after its imports
    return {**peer, "total_time_s": timing["wall_s"], **timing}


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_benchmark(args: argparse.Namespace) -> dict:
    """Runs parts (a)-(c) and returns the report (everything the JSON holds)."""
    backend = jax.default_backend()
    if backend == "cpu":
        peak = step_in_subprocess("", 1, 0, 0.0)["peak_flops"]  # every core on one device
        peak_source = "mfu_vs_matmul_peak: best 2048^3 fp32 jnp.matmul here, all cores"
    else:
        peak, peak_source = trainer.peak_flops(0.0), "trainer.PEAK_FLOPS (dense bf16 datasheet)"
    report = {
        "date": datetime.date.today().isoformat(),
        "host": platform.node(),
        "backend": backend,
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
        "load_avg_1m_at_start": os.getloadavg()[0],  # > 0.5 on a small box: numbers are noisy
        "peak_flops": peak,
        "peak_source": peak_source,
        "steps": [],
    }
    e2e_config = load_config(args.e2e_config)
    specs = [args.config]
    if load_config(args.config).to_dict() != e2e_config.to_dict():
        specs.append(args.e2e_config)
    else:
        report["same_config"] = f"{args.e2e_config} equals {args.config}; timed once"
    for spec in specs:
        if backend != "cpu":
            report["steps"].append(main_job_step(spec, args.timed_steps, peak))
            continue
        config = load_config(spec)
        per_core = cpu_device_count(-1, (config.data.batch_size // config.train.grad_accum_steps,))
        for devices in sorted({1, per_core}):
            report["steps"].append(step_in_subprocess(spec, devices, args.timed_steps, peak))
    if backend == "gpu":
        report["steps"].append(gpt2_step(args.timed_steps, args.gpt2_batch, peak))
    else:
        report["gpt2_124m"] = f"skipped: needs a GPU (backend is {backend})"

    steps = args.steps or e2e_config.train.num_steps
    m = e2e_config.model
    e2e = {
        "config": args.e2e_config,
        "steps": steps,
        "differences": f"ours: tie_embeddings={m.tie_embeddings}, LayerNorm with bias, "
        "tanh GELU, shuffled packed windows; peer (nanoGPT): tied, LayerNorm without bias, "
        "exact GELU, random windows",
    }
    e2e["runs"] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        data_flags = None
        for i in range(args.repeats):
            # The two never share the cores; their order alternates so that a slow spell of the
            # machine does not always land on the same one.
            order = ("ours", "peer") if i % 2 == 0 else ("peer", "ours")
            run = {"order": list(order) if args.peer_python else ["ours"]}
            for who in run["order"]:
                if who == "ours":
                    run["ours"] = run_ours(args.e2e_config, steps, tmp / f"ours{i}")
                    data_flags = data_flags or peer_data(args.e2e_config, tmp / f"ours{i}", tmp)
                else:
                    run["peer"] = run_peer(args.peer_python, args.e2e_config, steps, data_flags)
            e2e["runs"].append(run)
            print(f"end-to-end run {i + 1}/{args.repeats}: " + ", ".join(
                f"{who} {run[who]['total_time_s']:.1f} s" for who in run["order"]
            ), file=sys.stderr, flush=True)  # fmt: skip
    e2e["ours"] = _medians([r["ours"] for r in e2e["runs"]])
    if args.peer_python:
        e2e["peer"] = _medians([r["peer"] for r in e2e["runs"]])
        for key, name in (("total_time_s", "total_time"), ("step_time_ms", "step_time")):
            ratios = [r["peer"][key] / r["ours"][key] for r in e2e["runs"]]
            e2e[f"peer_over_ours_{name}"] = statistics.median(ratios)
            e2e[f"peer_over_ours_{name}_each"] = ratios
    else:
        e2e["peer"] = "skipped: no --peer-python"
    report["end_to_end"] = e2e
    report["load_avg_1m_at_end"] = os.getloadavg()[0]
    return report


def _medians(runs: list[dict]) -> dict:
    """Per-key medians of the runs' measurements (floats); everything else from the first run."""
    out = dict(runs[0])
    for key, value in out.items():
        if isinstance(value, float):
            out[key] = statistics.median(r[key] for r in runs)
    return out


def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def format_tables(report: dict) -> str:
    """The report as markdown: one table of train steps, one of the end-to-end runs."""
    lines = [
        f"Device: {report['device_kind']} ({report['cpu']}, {report['cpu_count']} CPUs), "
        f"jax {report['jax_version']}, flax {report['flax_version']}, {report['date']}",
        f"MFU peak: {_fmt(report['peak_flops'], '.3g')} FLOP/s ({report['peak_source']}); "
        f"load average {report['load_avg_1m_at_start']:.1f} at start, "
        f"{report['load_avg_1m_at_end']:.1f} at end",
        "",
        "| train step | params | tokens/step | compile s | step ms (median) | tokens/s | MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["steps"]:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(
            f"| {r['name']} | {r['num_params'] / 1e6:.2f}M | {r['tokens_per_step']} | "
            f"{r['compile_s']:.1f} | {r['step_time_ms']:.2f} | {r['tokens_per_s']:,.0f} | "
            f"{mfu} |"
        )
    for note in (report.get("same_config"), report.get("gpt2_124m")):
        if note:
            lines.append(f"| {note} | | | | | | |")
    e2e = report["end_to_end"]
    ours, peer = e2e["ours"], e2e["peer"]
    has_peer = isinstance(peer, dict)
    runs = e2e["runs"]
    lines += [
        "",
        f"| {e2e['config']}, {e2e['steps']} steps, median of {len(runs)} run(s) | ours (JAX, "
        f"{ours['devices']} device(s)) | peer (PyTorch) | peer / ours |",
        "|---|---|---|---|",
    ]
    rows = [
        ("wall time, s (process start to exit)", "total_time_s", ".1f"),
        ("train loop time, s (no eval)", "train_time_s", ".1f"),
        ("step time, ms (median)", "step_time_ms", ".2f"),
        ("val loss, held-out plays (nats/char)", "val_loss", ".4f"),
    ]
    for label, key, spec in rows:
        p = peer[key] if has_peer else None
        ratio = p / ours[key] if has_peer and key != "val_loss" else None
        if has_peer and key in ("total_time_s", "step_time_ms"):  # the median of the ratios
            ratio = e2e["peer_over_ours_" + key.rsplit("_", 1)[0]]
        lines.append(
            f"| {label} | {_fmt(ours[key], spec)} | {_fmt(p, spec) if has_peer else peer} | "
            f"{_fmt(ratio, '.2f')} |"
        )
    lines += [
        "",
        "| run | order | ours wall s | peer wall s | peer / ours | ours step ms | peer step ms | "
        "other CPU s (ours, peer) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, run in enumerate(runs):
        o, p = run["ours"], run.get("peer") or {}
        lines.append(
            f"| {i + 1} | {', '.join(run['order'])} | {o['total_time_s']:.1f} | "
            f"{_fmt(p.get('total_time_s'), '.1f')} | "
            f"{_fmt(p['total_time_s'] / o['total_time_s'] if p else None, '.2f')} | "
            f"{o['step_time_ms']:.2f} | {_fmt(p.get('step_time_ms'), '.2f')} | "
            f"{o['other_cpu_s']:.1f}, {_fmt(p.get('other_cpu_s'), '.1f')} |"
        )
    if has_peer:
        lines.append(
            f"\nPeer: torch {peer['torch_version']}, {peer['threads']} threads, "
            f"{peer['num_params'] / 1e6:.3f}M params, eval over {peer['eval_tokens']:,} tokens."
        )
    return "\n".join(lines)


def write_json(report: dict, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=0, help="end-to-end steps; 0: the config's (2000)")
    p.add_argument("--repeats", type=int, default=3, help="end-to-end runs of each, interleaved")
    p.add_argument("--timed-steps", type=int, default=100, help="train steps timed in part (a)")
    p.add_argument(
        "--peer-python", default="", help="an interpreter with torch for nanogpt_peer.py"
    )
    p.add_argument("--out", default="", help="JSON path; default experiments/results/...")
    p.add_argument("--config", default=MAIN_CONFIG, help="the main job's config, path[:arg]")
    p.add_argument("--e2e-config", default=MAIN_CONFIG + ":baby", help="end-to-end run's config")
    p.add_argument("--gpt2-batch", type=int, default=16, help="GPT-2 124M batch (GPU only)")
    # Internal: part (a)'s subprocesses.
    p.add_argument("--step-only", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cpu-devices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--peak", type=float, default=0.0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def step_only(args: argparse.Namespace) -> None:
    """The --step-only subprocess: one JSON line with the step timing of args.step_only (or,
    for an empty spec, the matmul peak) on args.cpu_devices CPU devices."""
    use_cpu_cores(args.cpu_devices)
    if not args.step_only:
        print(json.dumps({"peak_flops": matmul_peak_flops()}))
        return
    result = main_job_step(args.step_only, args.timed_steps, args.peak or None)
    threads = available_cores() if result["devices"] == 1 else 1
    result["name"] += f", {result['devices']} device(s) x {threads} thread(s)"
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.step_only is not None:
        return step_only(args)
    report = run_benchmark(args)
    print(format_tables(report))
    out = (
        args.out
        or ROOT / f"experiments/results/train_throughput_{report['backend']}_{report['date']}.json"
    )
    for path in (pathlib.Path(out), LATEST_JSON):
        write_json(report, path)
        print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
