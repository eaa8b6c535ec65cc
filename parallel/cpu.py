"""One XLA device per CPU core: data parallelism across the cores of a CPU host.

XLA:CPU splits each op over its thread pool, which pays off for big matmuls but not for the
hundreds of small ops in a small model's step, where the threads mostly wait on each other.
Giving each core its own single-threaded device and splitting the batch between them (the `dp`
rules) keeps every core busy instead: nanoGPT's baby GPT step goes from 38 to 23 ms on 2 cores
(experiments/benchmarks/train_throughput.py). It must be chosen before JAX starts its backend.

XLA:CPU (jax 0.10) can deadlock when several programs with collectives are in flight and the host
has no more threads than devices (two devices on two cores hang in an all-reduce rendezvous), so
calls over such a mesh go through `one_at_a_time`, which waits for each result.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import jax

log = logging.getLogger(__name__)

SINGLE_THREAD_FLAG = "--xla_cpu_multi_thread_eigen=false"


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_device_count(requested: int, batch_sizes: tuple[int, ...] = ()) -> int:
    """How many CPU devices to make: `requested` (-1: one per core), at most the cores, and the
    largest such count that divides every batch size (each device takes an equal slice).

    Args:
      requested: 0 or 1 = one device using every core; -1 = one per core; n = up to n.
      batch_sizes: global batch sizes the devices must split evenly (train, eval).
    """
    if requested < -1:
        raise ValueError(f"parallel.cpu_devices={requested}: use -1 (one per core), 0 or a count")
    cores = available_cores()
    n = cores if requested == -1 else min(max(requested, 1), cores)
    while n > 1 and any(size % n for size in batch_sizes if size):
        n -= 1
    return n


def use_cpu_cores(num_devices: int) -> bool:
    """Makes the CPU backend `num_devices` single-threaded devices; must run before JAX starts it.

    Returns True if applied; False (with a warning) if the backend had already started, in
    which case the run keeps the devices it has. Accelerator backends are not affected.
    """
    if num_devices <= 1:
        return False
    try:
        jax.config.update("jax_num_cpu_devices", num_devices)
    except RuntimeError:
        if jax.devices("cpu") and len(jax.devices("cpu")) == num_devices:
            return True  # already so (e.g. a second run in one process)
        log.warning(
            "%d CPU devices requested, but JAX had already started with %d; call "
            "parallel.cpu.use_cpu_cores() before any JAX computation to use every core",
            num_devices,
            len(jax.devices("cpu")),
        )
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:  # XLA reads the flags when the backend starts
        os.environ["XLA_FLAGS"] = f"{flags} {SINGLE_THREAD_FLAG}".strip()
    return True


def one_at_a_time(fn: Callable) -> Callable:
    """`fn` (a jitted function over several CPU devices) made to return only once its outputs are
    ready, so that no two of its programs are ever in flight together (see the module doc)."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return jax.block_until_ready(fn(*args, **kwargs))

    return call


def needs_one_at_a_time(devices=None) -> bool:
    """True for several CPU devices: calls over them should go through `one_at_a_time`."""
    devices = jax.devices() if devices is None else list(devices)
    return len(devices) > 1 and devices[0].platform == "cpu"
