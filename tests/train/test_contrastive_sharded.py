"""The data-parallel contrastive losses equal the single-device loss on 8 fake CPU devices.

`--xla_force_host_platform_device_count` acts only before jax is imported, so the check runs in
a fresh interpreter (as tests/parallel/conftest.py does): contrastive_sharded_check.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = pathlib.Path(__file__).with_name("contrastive_sharded_check.py")


@pytest.fixture(scope="module")
def sharded_results() -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode:
        pytest.fail(f"{SCRIPT.name} failed:\n{proc.stderr[-5000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_sharded_loss_and_gradients_equal_single_device(sharded_results, kind):
    sharded, single = sharded_results[kind]["loss"]
    assert sharded == pytest.approx(single, rel=1e-5)
    assert sharded_results[kind]["grad_max_abs_diff"] < 1e-5
