"""Helpers shared by the Pallas kernels: backend detection, interpret mode, compiler params."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
from jax.experimental import pallas as pl

_BACKEND_OVERRIDE: list[str] = []


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Kernels traced inside lower for `name` ("tpu", "gpu", "cpu"), not the default backend.

    For ahead-of-time compilation: on a CPU machine compiling for a TPU topology the default
    backend is still "cpu", and a kernel picks its lowering (and block sizes) while it is traced.
    """
    if name not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"backend {name!r} is not one of 'cpu', 'gpu', 'tpu'")
    _BACKEND_OVERRIDE.append(name)
    try:
        yield
    finally:
        _BACKEND_OVERRIDE.pop()


def backend() -> str:
    """The backend kernels lower for: `use_backend`'s, else the default: "cpu", "gpu" or "tpu"."""
    if _BACKEND_OVERRIDE:
        return _BACKEND_OVERRIDE[-1]
    platform = jax.default_backend()
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def resolve_interpret(interpret: bool | None) -> bool:
    """Interpret mode is the only way to run a Pallas kernel on CPU, so it is the CPU default."""
    return backend() == "cpu" if interpret is None else bool(interpret)


def pallas_call(kernel, *, interpret: bool, num_warps: int = 4, num_stages: int = 2, **kwargs):
    """`pl.pallas_call` that picks the backend explicitly.

    On GPU the Triton lowering is requested with Triton `CompilerParams`: jax 0.11 lowers a bare
    `pallas_call` to Mosaic GPU and 0.12 to Triton, so the params keep both on Triton. Our kernels
    use only Triton-compatible constructs (power-of-two blocks, ref slicing, `jnp.dot`).
    """
    if interpret:
        return pl.pallas_call(kernel, interpret=True, **kwargs)
    if backend() == "gpu":
        from jax.experimental.pallas import triton as pl_triton

        params = pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
        return pl.pallas_call(kernel, compiler_params=params, **kwargs)
    raise NotImplementedError(
        f"kernel {kwargs.get('name')!r} has a GPU (Triton) lowering only; backend {backend()!r} "
        "is not supported (pass interpret=True to run it in interpret mode, or use the reference)"
    )


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
