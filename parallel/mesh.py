"""Device meshes over the named axes that the sharding rules map logical axes onto.

`make_mesh({"fsdp": -1, "tensor": 2})` on 8 devices gives pipeline=1, data=1, fsdp=4, tensor=2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh

# Outermost to innermost. jax.make_mesh gives the last axes the most closely connected devices,
# so `tensor` (an all-reduce in every layer) is innermost and `pipeline` / `data` (one transfer or
# one gradient reduction per step) are outermost, where they can span slower links.
MESH_AXES = ("pipeline", "data", "fsdp", "tensor")


def _as_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
        return config.to_dict()
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"mesh config must be a mapping of axis name to size, got {type(config)}")


def mesh_shape(config: Any, num_devices: int) -> dict[str, int]:
    """Resolves the axis sizes of a mesh config: missing axes are 1, one axis may be -1 (the rest).

    Args:
      config: a mapping (or ConfigDict) from names in MESH_AXES to sizes.
      num_devices: how many devices the mesh must cover.

    Returns:
      {axis: size} for every axis of MESH_AXES, in that order; the sizes multiply to num_devices.
    """
    sizes = _as_dict(config)
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; the axes are {MESH_AXES}")
    shape = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}
    bad = {axis: size for axis, size in shape.items() if size < 1 and size != -1}
    if bad:
        raise ValueError(f"mesh axis sizes must be positive or -1 (the rest), got {bad}")
    rest = [axis for axis, size in shape.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"only one mesh axis may be -1 (the rest), got {rest}")
    fixed = math.prod(size for size in shape.values() if size != -1)
    if rest:
        if num_devices % fixed:
            raise ValueError(
                f"mesh axes {_describe(shape)} need a multiple of {fixed} devices for "
                f"{rest[0]}=-1, but there are {num_devices} devices"
            )
        shape[rest[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"mesh axes {_describe(shape)} multiply to {fixed}, but there are {num_devices} "
            "devices; make the product match or set one axis to -1"
        )
    return shape


def _describe(shape: Mapping[str, int]) -> str:
    return ", ".join(f"{axis}={size}" for axis, size in shape.items())


def make_mesh(config: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over MESH_AXES sized from `config` (see `mesh_shape`); default: all data parallel.

    Device order follows the physical topology on TPU and GPU (`jax.make_mesh` builds on
    `mesh_utils.create_device_mesh`). Axes are `Auto`: shardings come from jit's in/out
    shardings and `with_sharding_constraint`, and XLA's GSPMD partitioner propagates the rest.

    Args:
      config: {axis: size} for axes of MESH_AXES, e.g. {"fsdp": -1, "tensor": 2}; None means
        {"data": -1}.
      devices: the devices to use; all of `jax.devices()` by default.
    """
    if config is None:
        config = {"data": -1}
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(config, len(devices))
    return jax.make_mesh(
        tuple(shape.values()),
        tuple(shape),
        axis_types=(AxisType.Auto,) * len(shape),
        devices=devices,
    )
