"""Tests for parallel/distributed.py: reading the launch environment (no processes started)."""

from __future__ import annotations

import jax
import pytest

from parallel import distributed
from parallel.distributed import Launch, detect

SLURM = {
    "SLURM_JOB_ID": "77",
    "SLURM_STEP_NODELIST": "node[01-02]",
    "SLURM_NTASKS": "16",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "3",
}


@pytest.mark.parametrize(
    "environ, tpu_vm, expected",
    [
        ({}, False, Launch("single", 1, None)),
        (
            {
                "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": "1",
            },
            False,
            Launch(
                "explicit",
                2,
                {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1},
            ),
        ),
        (
            {
                "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": "0",
                "JAX_LOCAL_DEVICE_IDS": "0,1",
            },
            False,
            Launch(
                "explicit",
                2,
                {
                    "coordinator_address": "127.0.0.1:1",
                    "num_processes": 2,
                    "process_id": 0,
                    "local_device_ids": [0, 1],
                },
            ),
        ),
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"},
            False,
            Launch("single", 1, None),
        ),
        (SLURM, False, Launch("slurm", 16, {"cluster_detection_method": "slurm"})),
        ({**SLURM, "SLURM_NTASKS": "1"}, False, Launch("single", 1, None)),
        # An sbatch script outside `srun` has no step: one process.
        (
            {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"},
            False,
            Launch("single", 1, None),
        ),
        ({}, True, Launch("tpu_vm", None, {})),
        ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, True, Launch("tpu_vm", 4, {})),
        (
            {"OMPI_COMM_WORLD_SIZE": "4"},
            False,
            Launch("ompi", 4, {"cluster_detection_method": "ompi"}),
        ),
        ({"OMPI_COMM_WORLD_SIZE": "1"}, False, Launch("single", 1, None)),
        # Explicit variables win over SLURM's; the switch wins over everything.
        (
            {
                **SLURM,
                "JAX_COORDINATOR_ADDRESS": "h:1",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": "0",
            },
            False,
            Launch(
                "explicit", 2, {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0}
            ),
        ),
        ({**SLURM, "PARALLEL_DISTRIBUTED": "off"}, True, Launch("single", 1, None)),
        ({"PARALLEL_DISTRIBUTED": "auto"}, False, Launch("auto", None, {})),
    ],
)
def test_detect(environ, tpu_vm, expected):
    assert detect(environ, tpu_vm=tpu_vm) == expected


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES, JAX_PROCESS_ID missing"),
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
            r"JAX_PROCESS_ID=2 is not in \[0, JAX_NUM_PROCESSES=2\)",
        ),
        ({**SLURM, "SLURM_NTASKS": "many"}, "SLURM_NTASKS='many' is not an integer"),
        ({"PARALLEL_DISTRIBUTED": "yes"}, "PARALLEL_DISTRIBUTED='yes'"),
    ],
)
def test_detect_errors_name_the_variable(environ, message):
    with pytest.raises(ValueError, match=message):
        detect(environ, tpu_vm=False)


def test_initialize_calls_jax_only_for_several_processes(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    assert distributed.initialize({}, tpu_vm=False).source == "single"
    assert calls == []
    launch = distributed.initialize(SLURM, tpu_vm=False)
    assert calls == [launch.kwargs] == [{"cluster_detection_method": "slurm"}]

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    distributed.initialize(SLURM, tpu_vm=False)  # already running: nothing more
    assert len(calls) == 1
