"""One single-threaded XLA device per CPU core (parallel/cpu.py): how many, when they apply, and
that a training run over them equals the one-device run.

The device count is fixed when JAX starts its backend, so every check that sets it runs in a
fresh interpreter.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from training_run import train

from parallel import cpu

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run_python(code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if proc.returncode:
        pytest.fail(f"subprocess failed:\n{proc.stderr[-4000:]}")
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "requested, cores, batch_sizes, expected",
    [
        (-1, 2, (12, 64), 2),
        (-1, 8, (12, 64), 4),  # the largest count that splits every batch evenly
        (-1, 4, (6,), 3),
        (3, 2, (), 2),  # never more devices than cores
        (0, 8, (12,), 1),
        (1, 8, (12,), 1),
        (-1, 2, (5,), 1),
        (-1, 2, (0, 12), 2),  # 0: no such batch
    ],
)
def test_cpu_device_count(monkeypatch, requested, cores, batch_sizes, expected):
    monkeypatch.setattr(cpu, "available_cores", lambda: cores)
    assert cpu.cpu_device_count(requested, batch_sizes) == expected


def test_cpu_device_count_rejects_a_bad_request():
    with pytest.raises(ValueError, match="cpu_devices=-2"):
        cpu.cpu_device_count(-2)


CHECK = """
import json, os
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from parallel.cpu import one_at_a_time, use_cpu_cores
applied = use_cpu_cores(2)
mesh = jax.make_mesh((2,), ("data",))
x = jax.device_put(jnp.arange(64.0).reshape(16, 4), NamedSharding(mesh, P("data")))
total = one_at_a_time(jax.jit(lambda x: (x * x).sum()))  # an all-reduce across the devices
# Many calls in a row: without one_at_a_time two devices on two cores can deadlock here.
values = [float(total(x)) for _ in range(50)]
late = use_cpu_cores(3)  # the backend has started: refused, with a warning
print(json.dumps({"applied": applied, "late": late, "devices": jax.device_count(),
                  "flags": os.environ["XLA_FLAGS"], "values": sorted(set(values))}))
"""


def test_use_cpu_cores_splits_the_host_before_jax_starts():
    result = json.loads(run_python(CHECK))
    assert result["applied"] and not result["late"]
    assert result["devices"] == 2
    assert cpu.SINGLE_THREAD_FLAG in result["flags"]
    assert result["values"] == [sum(i * i for i in range(64))]


@pytest.mark.slow
def test_training_over_cpu_cores_matches_one_device(tmp_path):
    """parallel.cpu_devices=2 trains data parallel over two devices: the one-device losses."""
    common = ["train.num_steps=6", "train.eval_every=3", "train.sample_tokens=0"]
    common += ["data.batch_size=8", "optimizer.decay_steps=6"]
    single = train(tmp_path / "one", None, *common)
    split = train(tmp_path / "two", None, *common, "parallel.cpu_devices=2")
    assert (single["devices"], split["devices"]) == (1, 2)
    assert split["losses"].keys() == single["losses"].keys()
    for step, loss in single["losses"].items():
        assert split["losses"][step] == pytest.approx(loss, rel=1e-5)
    assert split["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
