"""Kernel tests run with Pallas buffer poisoning on (NaN scratch), so unwritten data shows."""

import jax
import pytest


@pytest.fixture(autouse=True)
def _poison_buffers():
    """Pallas scratch buffers start as NaN (interpret mode already fills outputs with NaN)."""
    previous = jax.config.values["jax_pallas_poison_buffers"]
    jax.config.update("jax_pallas_poison_buffers", True)
    yield
    jax.config.update("jax_pallas_poison_buffers", previous)
