"""Logical-axis rules: the one table that maps the model's axis names to mesh axes.

Model code names logical axes only (`("embed", "mlp")`, `("batch", "seq", "embed")`); a rules
table says which mesh axes each name is split over. Names that no rule lists are replicated.
The presets are data parallelism, FSDP (ZeRO-3: parameters, gradients and optimizer state
sharded), Megatron tensor parallelism, pipeline stages ("pp*"), and their combinations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models import layers

# A rule maps one logical axis name to a mesh axis, a tuple of mesh axes, or None (replicated).
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Every strategy splits the batch over both data-like axes: FSDP is data parallelism whose
# parameters are also sharded, gathered just in time for each layer.
_DATA: Rules = (("batch", ("data", "fsdp")),)
# ZeRO-3 (Rajbhandari et al. 2020): every matrix has an `embed` dimension, so sharding it over
# `fsdp` shards all matrices, and with them their gradients and Adam moments. Norm scales and
# biases without an embed dimension are small and stay replicated.
_FSDP: Rules = (("embed", "fsdp"),)
# Megatron-LM (Shoeybi et al. 2019, section 3): Q/K/V and the MLP's up/gate projections are
# column-parallel (split on their output heads / mlp dimension), the attention output and MLP
# down projections row-parallel (split on their input), so each block needs one all-reduce
# forward per sub-layer. The vocabulary (embedding and logits) is split too. KV heads that do not
# divide the tensor axis (MQA) are replicated, as in Megatron.
_TENSOR: Rules = (
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)
# Pipeline stages (parallel/pipeline.py): the stacked [L] axis split into contiguous runs of
# layers, one per `pipeline` shard. Embeddings, final norm and head stay replicated over it.
_PIPELINE: Rules = (("layers", "pipeline"),)
# Left replicated by every preset: head_dim, norm, seq (and layers without "pp").

PRESETS: dict[str, Rules] = {
    "dp": _DATA,
    "fsdp": _DATA + _FSDP,
    "tp": _DATA + _TENSOR,
    "dp_tp": _DATA + _TENSOR,  # the same table as "tp": the mesh's data axis decides
    "fsdp_tp": _DATA + _FSDP + _TENSOR,
    "pp": _DATA + _PIPELINE,
    "pp_dp_tp": _DATA + _TENSOR + _PIPELINE,
    "pp_fsdp": _DATA + _FSDP + _PIPELINE,
    "pp_fsdp_tp": _DATA + _FSDP + _TENSOR + _PIPELINE,
}


def get_rules(rules: str | Rules) -> Rules:
    """A preset by name, or a rules table passed through."""
    if isinstance(rules, str):
        if rules not in PRESETS:
            raise ValueError(f"unknown sharding preset {rules!r}; presets are {sorted(PRESETS)}")
        return PRESETS[rules]
    return tuple(rules)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: str | Rules,
    axis_sizes: Mapping[str, int],
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """The PartitionSpec of an array whose dimensions have the given logical names.

    A mesh axis splits at most one dimension: if two names map to the same mesh axis the first
    dimension gets it (so an activation [batch, seq, embed] under FSDP is split on batch only).
    Mesh axes of size 1 are left out, and with `shape` given, so is a mesh axis that does not
    divide its dimension (that dimension is then replicated over it).

    Args:
      logical_axes: one name (or None) per dimension.
      rules: a preset name or rules table.
      axis_sizes: {mesh axis: size}, e.g. `mesh.shape`.
      shape: the array's shape, to check divisibility.
    """
    table = dict(get_rules(rules))
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        mesh_axes = table.get(name) if name is not None else None
        if isinstance(mesh_axes, str):
            mesh_axes = (mesh_axes,)
        chosen: list[str] = []
        size = 1
        for axis in mesh_axes or ():
            if axis not in axis_sizes:
                raise ValueError(f"rule {name!r} -> {axis!r} names an axis not in the mesh")
            n = axis_sizes[axis]
            if axis in used or n == 1:
                continue
            if shape is not None and shape[dim] % (size * n):
                continue
            chosen.append(axis)
            size *= n
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def named_sharding(
    mesh: Mesh, rules: str | Rules, logical_axes: Sequence[str | None], shape=None
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules, mesh.shape, shape))


# ------------------------------------------------------------------------------------------------
# Shardings of the train state.


def params_logical_axes(graphdef: nnx.GraphDef, params: Any) -> dict:
    """The logical axes of every parameter, as a pure dict shaped like `params`.

    The names live in the Params' metadata, which the graphdef keeps; `params` may be arrays or
    `jax.ShapeDtypeStruct`s (from `jax.eval_shape`).
    """
    model = nnx.merge(graphdef, params)
    out: dict = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = variable.get_metadata().get("logical_axes")
        if axes is None:
            raise ValueError(f"parameter {'/'.join(map(str, path))} has no logical_axes metadata")
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = tuple(axes)
    return out


def _dict_key_suffix(path) -> tuple:
    keys = []
    for entry in reversed(path):
        if not isinstance(entry, jax.tree_util.DictKey):
            break
        keys.append(entry.key)
    return tuple(reversed(keys))


def train_state_shardings(
    graphdef: nnx.GraphDef, state: dict, mesh: Mesh, rules: str | Rules
) -> dict:
    """NamedShardings for a train state {"step", "params", "opt_state"} (arrays or abstract).

    Parameters are sharded by their logical axes. An optimizer-state leaf whose path ends in a
    parameter's path and has its shape (Adam's mu and nu) follows that parameter; everything
    else (step, counts, scalars) is replicated.
    """
    axes = params_logical_axes(graphdef, state["params"])
    by_path: dict[tuple, tuple[tuple[int, ...], NamedSharding]] = {}

    def param_sharding(path, leaf):
        logical = axes
        for entry in path:
            logical = logical[entry.key]
        sharding = named_sharding(mesh, rules, logical, leaf.shape)
        by_path[_dict_key_suffix(path)] = (tuple(leaf.shape), sharding)
        return sharding

    params = jax.tree_util.tree_map_with_path(param_sharding, state["params"])
    replicated = NamedSharding(mesh, PartitionSpec())

    def follow_param(path, leaf):
        keys = _dict_key_suffix(path)
        for start in range(len(keys)):  # longest first: optax may nest states in dicts too
            match = by_path.get(keys[start:])
            if match is not None and match[0] == tuple(leaf.shape):
                return match[1]
        return replicated

    opt_state = jax.tree_util.tree_map_with_path(follow_param, state["opt_state"])
    rest = {k: jax.tree.map(lambda _: replicated, v) for k, v in state.items()}
    return {**rest, "params": params, "opt_state": opt_state}


# ------------------------------------------------------------------------------------------------
# Activations.


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: str | Rules) -> Iterator[None]:
    """Within this context, `models.layers.constrain` applies `with_sharding_constraint`.

    It acts while a function is traced: enter it inside the function that `jax.jit` traces (as
    `parallel.train` does), since a trace cached from outside the context has no constraints.
    """
    rules = get_rules(rules)

    def constraint(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
        return jax.lax.with_sharding_constraint(
            x, named_sharding(mesh, rules, logical_axes, x.shape)
        )

    layers._ACTIVATION_CONSTRAINT.append(constraint)
    try:
        yield
    finally:
        layers._ACTIVATION_CONSTRAINT.remove(constraint)
