"""Two processes on 127.0.0.1 (4 CPU devices each, gloo collectives) train like one with 8.

The test starts this file as a script: twice as the two processes of one jax.distributed run
(`parallel.initialize()` reads JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID),
and once as a single process with 8 devices. Each trains a few steps on the same 8-device mesh
and writes its losses and final parameters; the test compares them.

    python tests/parallel/test_multiprocess.py RULES OUT.npz

The pipeline case is marked slow: three more jax processes compiling cost ~40 s of CPU.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
NUM_STEPS = 3
# (rules, mesh): FSDP x TP splits the batch between the processes; the pipeline case puts
# stage 0 on process 0 and stage 1 on process 1, so activations cross between processes.
CASES = {
    "fsdp_tp": {"data": 2, "fsdp": 2, "tensor": 2},
    "pp_dp_tp": {"pipeline": 2, "data": 2, "tensor": 2},
}


def _worker(rules: str, out_path: str) -> None:
    # The shared tiny model, batch and optimizer; it sets 8 fake devices in XLA_FLAGS on import,
    # which this script replaces with jax_num_cpu_devices before jax starts its backend.
    import jax
    import sharded_step_check

    os.environ.pop("XLA_FLAGS", None)
    # 4 CPU devices per process, 8 for the single-process run; before any device is touched.
    jax.config.update("jax_num_cpu_devices", 8 // int(os.environ.get("JAX_NUM_PROCESSES", "1")))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_disable_most_optimizations", True)  # compile time; both sides

    import parallel

    parallel.initialize()
    from jax.experimental import multihost_utils

    from parallel.pipeline import PipelineConfig
    from parallel.train import (
        batch_sharding,
        init_sharded_train_state,
        make_sharded_train_step,
        shard_batch,
    )

    batch, optimizer = sharded_step_check.batch, sharded_step_check.optimizer
    cfg, mesh_config = sharded_step_check.MODELS["llama"], CASES[rules]
    mesh = parallel.make_mesh(mesh_config)
    pipeline = PipelineConfig(num_microbatches=2) if "pipeline" in mesh_config else None
    opt = optimizer()
    graphdef, state, shardings = init_sharded_train_state(cfg, opt, 0, mesh, rules)
    step = make_sharded_train_step(graphdef, opt, mesh, rules, shardings, pipeline=pipeline)
    # The same batch every step, so that the loss must fall.
    rows = _local_rows(batch_sharding(mesh, rules), batch(cfg))
    losses = []
    for i in range(NUM_STEPS):
        state, metrics = step(state, shard_batch(rows, mesh, rules), jax.random.key(i))
        losses.append(float(metrics["loss"]))
    params = multihost_utils.process_allgather(state["params"], tiled=True)
    results = {"losses": np.array(losses)}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        results["params/" + "/".join(str(k.key) for k in path)] = np.asarray(leaf)
    results["num_processes"] = np.array(jax.process_count())
    results["local_devices"] = np.array(jax.local_device_count())
    if jax.process_index() == 0:
        np.savez(out_path, **results)


def _local_rows(sharding, global_batch: dict) -> dict:
    """This process's rows of a global batch: those its devices hold under `sharding`."""
    size = next(iter(global_batch.values())).shape[0]
    indices = sharding.addressable_devices_indices_map((size,)).values()
    rows = sorted({r for (index,) in indices for r in range(*index.indices(size))})
    return {k: v[rows] for k, v in global_batch.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **extra)
    return env


def _run(rules: str, out: pathlib.Path) -> tuple[dict, dict]:
    """Starts the single 8-device process and the two 4-device ones; returns their results."""
    script = [sys.executable, str(pathlib.Path(__file__).resolve()), rules]
    single = subprocess.Popen(
        [*script, str(out / "single.npz")], cwd=ROOT, env=_env(), stderr=subprocess.PIPE
    )
    coordinator = f"127.0.0.1:{_free_port()}"
    workers = [
        subprocess.Popen(
            [*script, str(out / "multi.npz")],
            cwd=ROOT,
            env=_env(
                JAX_COORDINATOR_ADDRESS=coordinator,
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(pid),
            ),
            stderr=subprocess.PIPE,
        )
        for pid in range(2)
    ]
    for name, proc in [("single", single), ("process 0", workers[0]), ("process 1", workers[1])]:
        try:
            _, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for p in (single, *workers):
                p.kill()
            pytest.fail(f"{name} timed out")
        if proc.returncode:
            pytest.fail(f"{rules}: {name} failed:\n{err.decode()[-5000:]}")
    return dict(np.load(out / "single.npz")), dict(np.load(out / "multi.npz"))


def check_matches(single: dict, multi: dict) -> None:
    assert int(multi["num_processes"]) == 2 and int(multi["local_devices"]) == 4
    assert int(single["num_processes"]) == 1 and int(single["local_devices"]) == 8
    losses = multi["losses"]
    assert len(losses) == NUM_STEPS and np.all(np.isfinite(losses))
    np.testing.assert_allclose(losses, single["losses"], rtol=1e-5)
    assert losses[-1] < losses[0]  # it trained
    names = [k for k in single if k.startswith("params/")]
    assert len(names) >= 9
    scale = max(np.abs(single[k]).max() for k in names)
    for name in names:
        assert multi[name].shape == single[name].shape, name
        assert np.abs(multi[name] - single[name]).max() < 1e-5 * scale, name


def test_fsdp_tp_over_two_processes_matches_one(tmp_path):
    check_matches(*_run("fsdp_tp", tmp_path))


@pytest.mark.slow
def test_pipeline_across_two_processes_matches_one(tmp_path):
    """Stage 0 on process 0's devices, stage 1 on process 1's."""
    check_matches(*_run("pp_dp_tp", tmp_path))


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT), str(pathlib.Path(__file__).resolve().parent)]
    _worker(sys.argv[1], sys.argv[2])
