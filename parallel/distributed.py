"""Multi-process start-up: `initialize()` calls `jax.distributed.initialize` when the launch
environment (explicit variables, SLURM, a TPU VM slice, Open MPI) says there are several
processes, and does nothing for one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax

# Explicit launch (any cluster): all three, e.g. for process 1 of 2 on 127.0.0.1.
#   JAX_COORDINATOR_ADDRESS=127.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1
# and optionally JAX_LOCAL_DEVICE_IDS=0,1. PARALLEL_DISTRIBUTED=off skips initialisation;
# PARALLEL_DISTRIBUTED=auto leaves everything to jax's own cluster detection.
_EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# What jax's SLURM detection reads; SLURM_STEP_NODELIST only exists inside `srun`.
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process was launched.

    Attributes:
      source: "single", "explicit", "slurm", "tpu_vm", "ompi" or "auto".
      num_processes: the process count when the environment says it (None: jax finds it).
      kwargs: the arguments for `jax.distributed.initialize`; None means do not call it.
    """

    source: str
    num_processes: int | None
    kwargs: dict[str, Any] | None


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(f"{name}={environ[name]!r} is not an integer") from None


def on_tpu_vm() -> bool:
    """Whether TPU chips are attached (jax's own check: Google TPU PCI device ids)."""
    try:
        from jax._src import hardware_utils  # private, hence the guard
    except ImportError:
        return False
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0


def detect(environ: Mapping[str, str] | None = None, tpu_vm: bool | None = None) -> Launch:
    """Reads the launch environment; no side effects.

    Args:
      environ: the environment variables (os.environ by default).
      tpu_vm: whether this is a Cloud TPU VM (by default: TPU chips are attached).
    """
    environ = os.environ if environ is None else environ
    single = Launch("single", 1, None)
    switch = environ.get("PARALLEL_DISTRIBUTED", "").lower()
    if switch in ("off", "0", "false"):
        return single
    if switch == "auto":
        return Launch("auto", None, {})
    if switch:
        raise ValueError(f"PARALLEL_DISTRIBUTED={switch!r}; use 'auto', 'off' or leave it unset")

    given = [name for name in _EXPLICIT if name in environ]
    if given:
        missing = [name for name in _EXPLICIT if name not in environ]
        if missing:
            raise ValueError(f"{', '.join(given)} set but {', '.join(missing)} missing")
        num, pid = _int(environ, "JAX_NUM_PROCESSES"), _int(environ, "JAX_PROCESS_ID")
        if not 0 <= pid < num:
            raise ValueError(f"JAX_PROCESS_ID={pid} is not in [0, JAX_NUM_PROCESSES={num})")
        if num == 1:
            return single
        kwargs: dict[str, Any] = {
            "coordinator_address": environ["JAX_COORDINATOR_ADDRESS"],
            "num_processes": num,
            "process_id": pid,
        }
        if environ.get("JAX_LOCAL_DEVICE_IDS"):
            ids = environ["JAX_LOCAL_DEVICE_IDS"].split(",")
            kwargs["local_device_ids"] = [int(i) for i in ids]
        return Launch("explicit", num, kwargs)

    if all(name in environ for name in _SLURM):
        num = _int(environ, "SLURM_NTASKS")
        if num == 1:
            return single
        return Launch("slurm", num, {"cluster_detection_method": "slurm"})

    if tpu_vm if tpu_vm is not None else on_tpu_vm():
        # jax reads the slice's workers from the TPU metadata server (GCE) or from
        # TPU_WORKER_HOSTNAMES (GKE); a one-host slice initialises as one process.
        hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES")
        return Launch("tpu_vm", len(hosts.split(",")) if hosts else None, {})

    if "OMPI_COMM_WORLD_SIZE" in environ:
        num = _int(environ, "OMPI_COMM_WORLD_SIZE")
        if num > 1:
            return Launch("ompi", num, {"cluster_detection_method": "ompi"})
    return single


def initialize(environ: Mapping[str, str] | None = None, tpu_vm: bool | None = None) -> Launch:
    """Starts jax's distributed runtime if this is one of several processes; call it first.

    Must run before anything touches a jax device. Calling it again is a no-op.
    """
    launch = detect(environ, tpu_vm)
    if launch.kwargs is not None and not jax.distributed.is_initialized():
        jax.distributed.initialize(**launch.kwargs)
    return launch
