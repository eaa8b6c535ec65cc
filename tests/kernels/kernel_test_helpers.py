"""Helpers for the kernel tests: random inputs, relative error, tolerances by dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Relative error bounds: max |kernel - reference| / max |reference|.
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def tolerance(dtype) -> float:
    return TOLERANCE[jnp.dtype(dtype).name]


def relative_error(actual, expected) -> float:
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    assert np.all(np.isfinite(actual)), "kernel output has NaN/inf: an element was not written"
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def normal(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)
