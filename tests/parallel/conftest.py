"""Runs tests/parallel/sharded_step_check.py in a subprocess with 8 fake CPU devices.

`--xla_force_host_platform_device_count` only acts before jax is imported, and a pytest worker
may already have imported jax for another test file, so sharded runs get a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = pathlib.Path(__file__).with_name("sharded_step_check.py")


@pytest.fixture(scope="session")
def run_sharded_check():
    """run_sharded_check(request) -> the script's JSON results (see sharded_step_check.main)."""

    def run(request: dict) -> dict:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        env.pop("XLA_FLAGS", None)
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), json.dumps(request)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode:
            pytest.fail(f"{SCRIPT.name} failed:\n{proc.stderr[-5000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return run
