"""Tests for parallel/mesh.py: resolving axis sizes and building a mesh."""

from __future__ import annotations

import ml_collections
import pytest

from parallel.mesh import MESH_AXES, make_mesh, mesh_shape


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"data": 8}, {"data": 8}),
        ({"fsdp": -1}, {"fsdp": 8}),
        ({"data": 4, "tensor": 2}, {"data": 4, "tensor": 2}),
        ({"fsdp": -1, "tensor": 2}, {"fsdp": 4, "tensor": 2}),
        ({"pipeline": 2, "data": -1, "tensor": 2}, {"pipeline": 2, "data": 2, "tensor": 2}),
        (ml_collections.ConfigDict({"data": 2, "fsdp": 4}), {"data": 2, "fsdp": 4}),
    ],
)
def test_mesh_shape(config, expected):
    shape = mesh_shape(config, 8)
    assert tuple(shape) == MESH_AXES
    assert shape == {axis: expected.get(axis, 1) for axis in MESH_AXES}


@pytest.mark.parametrize(
    "config, message",
    [
        ({"data": 4}, "multiply to 4, but there are 8 devices"),
        ({"data": 3, "fsdp": -1}, "multiple of 3 devices"),
        ({"data": -1, "fsdp": -1}, "only one mesh axis may be -1"),
        ({"data": 0}, "positive or -1"),
        ({"tensr": 2}, "unknown mesh axes"),
    ],
)
def test_mesh_shape_errors_name_the_problem(config, message):
    with pytest.raises(ValueError, match=message):
        mesh_shape(config, 8)


def test_make_mesh_on_the_local_devices():
    import jax

    mesh = make_mesh()  # all data parallel
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == {**dict.fromkeys(MESH_AXES, 1), "data": jax.device_count()}
    with pytest.raises(ValueError, match="devices"):
        make_mesh({"tensor": jax.device_count() + 1})
