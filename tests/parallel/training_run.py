"""Runs the :runlocal char config through `train_and_evaluate` in a fresh interpreter, whose CPU
device count the caller picks (fake devices, or none: the config's parallel.cpu_devices)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

RUN = """
import json, sys
import jax
jax.config.update("jax_disable_most_optimizations", True)
from train.config_lib import apply_overrides, load_config_script
from train.trainer import train_and_evaluate
config = load_config_script("experiments/shakespeare_char.py:runlocal")
apply_overrides(config, sys.argv[2:])
result = train_and_evaluate(config, sys.argv[1])
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
print(json.dumps({"devices": jax.device_count(), "val_loss": result.val_loss, "losses": losses}))
"""


def train(workdir: pathlib.Path, devices: int | None, *overrides: str) -> dict:
    """{"devices", "val_loss", "losses"} of a run in `workdir` with `devices` fake CPU devices
    (None: no XLA flag, so the run's own parallel.cpu_devices decides)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    proc = subprocess.run(
        [sys.executable, "-c", RUN, str(workdir), *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if proc.returncode:
        pytest.fail(f"training ({devices} devices) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
