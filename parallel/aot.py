"""Ahead-of-time compilation for TPU slices on any machine: does a train step fit in HBM?

With libtpu (fetched into the project's cache on first use: `libtpu_available`),
`jax.experimental.topologies` describes the devices of a TPU slice without any chip; the
sharded train step lowers and compiles for them
and XLA's memory analysis says what each device would hold:

    topo = tpu_topology("v5e:2x4")
    report = compile_train_step(preset("gpt2-124m"), {"fsdp": -1}, "fsdp", topo, batch=64, seq=1024)
    report.fits, report.peak_bytes / 2**30

Nothing is allocated: the train state is abstract (`parallel.train.abstract_train_state`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

from models.config import ModelConfig
from parallel.mesh import make_mesh
from parallel.sharding import Rules
from parallel.train import abstract_train_state, batch_sharding, make_sharded_train_step

GiB = 2**30

# HBM per chip (bytes). Topology.hbm_bytes divides it among the chip's devices.
HBM_BYTES: dict[str, int] = {
    "v4": 32 * GiB,
    "v5e": 16 * GiB,
    "v5p": 95 * GiB,
    "v6e": 32 * GiB,
}


class LibtpuUnavailable(RuntimeError):
    """libtpu is not installed (or cannot load), so no TPU topology can be described."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """The compile-only devices of a TPU slice.

    Attributes:
      name: libtpu's topology name, e.g. "v5e:2x2" (chip generation : chips per dimension).
      chip: the generation, a key of HBM_BYTES.
      devices: compile-only `jax.Device`s (platform "tpu"); they run nothing.
      hbm_bytes: HBM per device: a chip's HBM, split between its devices where libtpu lists
        each TensorCore of a chip as a device (v4 here: 2 per chip).
    """

    name: str
    chip: str
    devices: tuple[Any, ...]
    hbm_bytes: int

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def num_chips(self) -> int:
        return len({tuple(d.coords) for d in self.devices})

    @property
    def device_kind(self) -> str:
        return self.devices[0].device_kind


# The libtpu that jax 0.10.2's `jax[tpu]` extra pins. It is fetched into the project's cache, not
# installed into the environment: an importable libtpu makes every jax program on a CPU machine
# try (and loudly fail) to open a TPU unless JAX_PLATFORMS says otherwise.
LIBTPU_REQUIREMENT = "libtpu==0.0.42.*"


def _libtpu_dir() -> pathlib.Path:
    from models.hub import cache_dir

    return cache_dir() / ("libtpu-" + LIBTPU_REQUIREMENT.split("==")[1].rstrip(".*"))


def libtpu_available(fetch: bool = True) -> tuple[bool, str]:
    """(True, version) when libtpu can be imported, else (False, the reason).

    With `fetch`, a libtpu missing from the environment is pip-installed once into the cache
    (`LIBTPU_REQUIREMENT`, Linux x86_64 wheels only) and put on sys.path for this process.
    """
    target = _libtpu_dir()
    if target.is_dir() and str(target) not in sys.path:
        sys.path.append(str(target))
    try:
        import libtpu
    except ImportError as e:
        if not fetch:
            return False, f"libtpu cannot be imported ({e})"
        staging = target.with_name(target.name + f".tmp-{os.getpid()}")
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
        cmd += ["--target", str(staging), LIBTPU_REQUIREMENT]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            shutil.rmtree(staging, ignore_errors=True)
            return False, f"pip could not install {LIBTPU_REQUIREMENT}: {proc.stderr[-500:]}"
        try:
            os.replace(staging, target)  # atomic: a half-installed libtpu is never used
        except OSError:  # another process installed it first
            shutil.rmtree(staging, ignore_errors=True)
        return libtpu_available(fetch=False)
    except Exception as e:  # a broken install failing at import
        return False, f"libtpu cannot be imported ({type(e).__name__}: {e})"
    return True, getattr(libtpu, "__version__", "unknown version")


def tpu_topology(name: str) -> Topology:
    """The devices of a TPU slice, e.g. "v5e:2x2", "v5e:2x4", "v5p:2x2x1", "v4:2x2x1".

    Works on a CPU-only machine (also under JAX_PLATFORMS=cpu): libtpu describes the slice,
    no TPU is opened.

    Raises:
      ValueError: an unknown chip generation or a topology name libtpu rejects.
      LibtpuUnavailable: libtpu is not installed.
    """
    chip = name.split(":", 1)[0]
    if chip not in HBM_BYTES or ":" not in name:
        raise ValueError(
            f"topology {name!r} must look like '<chip>:<dims>' with chip in {sorted(HBM_BYTES)}, "
            "e.g. 'v5e:2x2'"
        )
    ok, reason = libtpu_available()
    if not ok:
        raise LibtpuUnavailable(reason)
    from jax.experimental import topologies

    # libtpu takes /tmp/libtpu_lockfile so that two processes never drive one TPU; describing a
    # slice drives none, and tests, benchmarks and notebooks may do it at the same time.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        desc = topologies.get_topology_desc(topology_name=name, platform="tpu")
    except Exception as e:  # libtpu's errors are JaxRuntimeError with a status message
        raise ValueError(f"libtpu rejects topology {name!r}: {e}") from e
    devices = tuple(desc.devices)
    chips = len({tuple(d.coords) for d in devices})
    hbm = HBM_BYTES[chip] * chips // len(devices)
    return Topology(name=name, chip=chip, devices=devices, hbm_bytes=hbm)


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """XLA's compiled memory analysis of one program, per device, against the device's HBM.

    `peak_bytes` = arguments + outputs - aliased (donated buffers reused for outputs) + temporaries
    + generated code: what must be resident at once, by the compiler's own accounting (an
    estimate, not a measurement). When the TPU compiler itself gives up (RESOURCE_EXHAUSTED:
    even after rematerialising it needs more than HBM), the byte fields are None and `error`
    holds its message.
    """

    topology: str
    device_kind: str
    num_devices: int
    mesh: dict[str, int]
    rules: str
    hbm_bytes: int
    compile_s: float
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    temp_bytes: int | None = None
    generated_code_bytes: int | None = None
    error: str | None = None

    @property
    def peak_bytes(self) -> int | None:
        if self.error is not None:
            return None
        return (
            self.argument_bytes
            + self.output_bytes
            - self.alias_bytes
            + self.temp_bytes
            + self.generated_code_bytes
        )

    @property
    def fits(self) -> bool:
        return self.error is None and self.peak_bytes <= self.hbm_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "peak_bytes": self.peak_bytes, "fits": self.fits}


def _report(topology: Topology, mesh, rules, compile_s: float, **fields) -> MemoryReport:
    return MemoryReport(
        topology=topology.name,
        device_kind=topology.device_kind,
        num_devices=topology.num_devices,
        mesh={axis: int(size) for axis, size in mesh.shape.items()},
        rules=rules if isinstance(rules, str) else "custom",
        hbm_bytes=topology.hbm_bytes,
        compile_s=compile_s,
        **fields,
    )


def compile_for_memory(lowered, topology: Topology, mesh, rules) -> MemoryReport:
    """Compiles a lowered program and reads `compiled.memory_analysis()` into a MemoryReport.

    An out-of-memory refusal of the TPU compiler becomes a report with `error` set; any other
    compile error propagates.
    """
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return _report(topology, mesh, rules, time.perf_counter() - start, error=str(e))
    compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError(f"the compiler gave no memory analysis for {topology.name}")
    return _report(
        topology,
        mesh,
        rules,
        compile_s,
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
        temp_bytes=int(stats.temp_size_in_bytes),
        generated_code_bytes=int(stats.generated_code_size_in_bytes),
    )


def default_optimizer() -> optax.GradientTransformation:
    """The trainer's optimizer (clipped AdamW, float32 moments) with the default hyperparameters."""
    from train.defaults import base_config
    from train.optimizer import make_optimizer

    return make_optimizer(base_config().optimizer, num_steps=1000)[0]


def compile_train_step(
    model_cfg: ModelConfig,
    mesh_config: dict[str, int],
    rules: str | Rules,
    topology: Topology | str,
    batch: int,
    seq: int,
    *,
    optimizer: optax.GradientTransformation | None = None,
    grad_accum_steps: int = 1,
) -> MemoryReport:
    """Compiles `parallel.train.make_sharded_train_step` for a TPU slice and reports its memory.

    Args:
      model_cfg: the model (its dtype is the compute dtype, e.g. bfloat16, param_dtype the
        storage of parameters and Adam moments).
      mesh_config: {axis: size} over parallel.mesh.MESH_AXES, e.g. {"fsdp": -1, "tensor": 2}.
      rules: a sharding preset name ("dp", "fsdp", "fsdp_tp", ...) or a rules table.
      topology: a Topology or its name (e.g. "v5e:2x2").
      batch: global batch size (sequences per optimizer step), split over the batch rule.
      seq: tokens per sequence (<= model_cfg.max_seq_len for learned positions).
      optimizer: default `default_optimizer()`.
      grad_accum_steps: micro-batches per step (the batch is split into them).

    Returns:
      The per-device MemoryReport (arguments, outputs, temporaries, code) and whether it fits.
      Compiling a ~1B model takes minutes: the TPU compiler rematerialises programs near the
      HBM limit, which is slow.
    """
    if isinstance(topology, str):
        topology = tpu_topology(topology)
    if seq > model_cfg.max_seq_len and model_cfg.position == "learned":
        raise ValueError(f"seq={seq} exceeds the learned positions' max_seq_len")
    if batch % grad_accum_steps:
        raise ValueError(f"batch={batch} is not divisible by grad_accum_steps={grad_accum_steps}")
    optimizer = optimizer or default_optimizer()
    mesh = make_mesh(mesh_config, devices=topology.devices)
    graphdef, abstract_state, shardings = abstract_train_state(model_cfg, optimizer, mesh, rules)
    step = make_sharded_train_step(
        graphdef, optimizer, mesh, rules, shardings, grad_accum_steps=grad_accum_steps
    )
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=batch_sharding(mesh, rules))
    abstract_batch = {"inputs": tokens, "targets": tokens}
    key = jax.eval_shape(lambda: jax.random.key(0))  # a typed key, as the trainer passes
    # Pallas kernels (attention_impl="pallas") pick their TPU lowering while traced, and Mosaic
    # reads the chip generation from the default device while lowering.
    from kernels import _common

    with _common.use_backend("tpu"), jax.default_device(topology.devices[0]):
        lowered = step.lower(abstract_state, abstract_batch, key)
    return compile_for_memory(lowered, topology, mesh, rules)
