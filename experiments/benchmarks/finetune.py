"""Full fine-tuning vs LoRA vs QLoRA: trainable fraction, peak host memory and step time.

Run from the repository root on an otherwise idle machine:
  python experiments/benchmarks/finetune.py [--steps 6] [--config experiments/sft_smollm2_lora.py]

Each mode trains the config (SmolLM2-135M-Instruct on the Britannica chats by default) for a
few steps in its own process, so the peak resident memory (ru_maxrss: on CPU this is all of
params, gradients, optimizer state and activations) belongs to that mode alone. The step time
is the median over the steps after the first (which compiles). Prints a markdown table and
writes JSON to --out (default experiments/results/finetune_cpu_<date>.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MODES = {
    # name: config overrides
    "full": {"lora.rank": 0},
    "lora": {},
    "qlora_int8": {"model.quant": "int8"},
    "qlora_int4": {"model.quant": "int4"},
}


def run_mode(config_spec: str, mode: str, steps: int, workdir: str, extra: list[str]) -> dict:
    """Trains one mode in this process and returns its measurements."""
    from train.config_lib import apply_overrides, load_config_script
    from train.trainer import train_and_evaluate

    config = load_config_script(config_spec)
    overrides = dict(MODES[mode])
    if mode == "full":
        overrides["optimizer.learning_rate"] = 2e-5  # a full-FT rate; it does not change speed
    overrides.update(
        {
            "train.num_steps": steps,
            "optimizer.warmup_steps": 1,  # a short run must still fit its schedule
            "train.log_every": 1,
            "train.eval_every": 10**6,
            "train.checkpoint_every": 10**6,
            "train.answer_eval": 0,
            "train.progress_bar": False,
            "train.tensorboard": False,
        }
    )
    apply_overrides(config, [f"{k}={v}" for k, v in overrides.items()] + extra)
    train_and_evaluate(config, workdir)
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").open()]
    step_times = [r["step_time_s"] for r in rows if "step_time_s" in r]
    sizes = next(r for r in rows if "params" in r)
    return {
        "mode": mode,
        "params": sizes["params"],
        "trained_params": sizes["trained"],
        "compile_time_s": sizes["compile_time_s"],
        "step_time_s": statistics.median(step_times),
        "tokens_per_step": config.data.batch_size * config.data.seq_len,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_loss": rows[-1].get("loss") if rows else None,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/sft_smollm2_lora.py")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--set", action="append", default=[], help="a config override key=value (repeatable)"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one mode
    return parser.parse_args(argv)


def main(argv=None) -> dict | int:
    args = parse_args(argv)
    if args.child:
        with tempfile.TemporaryDirectory() as workdir:
            result = run_mode(args.config, args.child, args.steps, workdir, args.set)
            print(json.dumps(result))
        return 0
    results = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; choose from {sorted(MODES)}")
        cmd = [sys.executable, __file__, "--child", mode, "--config", args.config]
        cmd += ["--steps", str(args.steps)] + [f"--set={s}" for s in args.set]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(result)
        print(f"{mode}: {result}", file=sys.stderr)
    print("| mode | trained parameters | step time (s) | tokens/s | peak host memory (MB) |")
    print("|---|---|---|---|---|")
    for r in results:
        tok_s = r["tokens_per_step"] / r["step_time_s"]
        share = f"{r['trained_params'] / 1e6:.2f}M ({r['trained_params'] / r['params']:.2%})"
        print(
            f"| {r['mode']} | {share} | {r['step_time_s']:.2f} | {tok_s:.0f} "
            f"| {r['peak_rss_mb']:.0f} |"
        )
    date = datetime.date.today().isoformat()
    out = pathlib.Path(args.out or ROOT / f"experiments/results/finetune_cpu_{date}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": date,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg(),
        "config": args.config,
        "steps": args.steps,
        "overrides": args.set,
        "results": results,
    }
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
