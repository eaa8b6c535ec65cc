"""Pallas kernels, each beside its plain-JAX reference (planned: see the issues)."""
