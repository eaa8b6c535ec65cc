"""The trainer's step, jitted with shardings: the same step function on any mesh and rules.

mesh = make_mesh({"fsdp": -1, "tensor": 2})
graphdef, state, shardings = init_sharded_train_state(model_cfg, optimizer, 0, mesh, "fsdp_tp")
step = make_sharded_train_step(graphdef, optimizer, mesh, "fsdp_tp", shardings)
# pipeline: mesh {"pipeline": 2, "data": 2, "tensor": 2}, rules "pp_dp_tp",
#   make_sharded_train_step(..., pipeline=PipelineConfig(num_microbatches=4))
state, metrics = step(state, shard_batch(batch, mesh, "fsdp_tp"), key)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.config import ModelConfig
from parallel.pipeline import PipelineConfig, check_rules, use_pipeline
from parallel.sharding import Rules, named_sharding, train_state_shardings, use_rules
from train import trainer


def batch_sharding(mesh: Mesh, rules: str | Rules) -> NamedSharding:
    """Batches ([B, ...] arrays) are split on their first dimension by the `batch` rule."""
    return named_sharding(mesh, rules, ("batch",))


def check_batch_size(size: int, mesh: Mesh, rules: str | Rules) -> None:
    """Raises ValueError unless a global batch of `size` rows splits evenly over the shards of
    the `batch` rule."""
    spec = batch_sharding(mesh, rules).spec
    num_shards = math.prod(mesh.shape[axis] for axis in _spec_axes(spec[:1]))
    if size % num_shards:
        raise ValueError(
            f"global batch size {size} is not divisible by the {num_shards} batch shards of {spec}"
        )


def shard_batch(batch: dict, mesh: Mesh, rules: str | Rules) -> dict:
    """Makes global arrays from this process's rows of a batch, split by the `batch` rule.

    With several processes each passes only its own rows (its data shard, e.g. from
    `build_datasets(..., jax.process_index(), jax.process_count())`); the global batch is the
    processes' rows in process order. With one process this is `jax.device_put`.
    """
    sharding = batch_sharding(mesh, rules)

    def to_global(x):
        x = np.asarray(x)
        # With several processes jax infers the global shape from the sharding and checks it.
        if jax.process_count() == 1:
            check_batch_size(x.shape[0], mesh, rules)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(to_global, batch)


def _spec_axes(spec) -> list[str]:
    axes = []
    for entry in spec:
        axes.extend((entry,) if isinstance(entry, str) else entry or ())
    return axes


def abstract_train_state(
    model_cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: str | Rules,
) -> tuple[Any, dict, dict]:
    """The train state's shapes and dtypes with its shardings, allocating nothing.

    Returns:
      (graphdef, state of `jax.ShapeDtypeStruct`s carrying their shardings, state shardings).
      The abstract state is the target that `train.checkpoint.Checkpointer.restore` reads into,
      so a checkpoint written under any mesh restores onto this one.
    """
    graphdef, abstract = jax.eval_shape(lambda: trainer.init_train_state(model_cfg, optimizer, 0))
    shardings = train_state_shardings(graphdef, abstract, mesh, rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )
    return graphdef, abstract, shardings


def init_sharded_train_state(
    model_cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    seed: int,
    mesh: Mesh,
    rules: str | Rules,
) -> tuple[Any, dict, dict]:
    """Initialises the train state directly into its shardings (no device holds all of it).

    Returns:
      (graphdef, state, state shardings); the values equal `trainer.init_train_state`'s (on
      CPU up to the last bit of some floats: see below).
    """
    graphdef, _, shardings = abstract_train_state(model_cfg, optimizer, mesh, rules)
    init = jax.jit(
        lambda: trainer.init_train_state(model_cfg, optimizer, seed)[1], out_shardings=shardings
    )
    # It runs once, so on CPU it is compiled without XLA's backend optimisations: 0.4 instead of
    # 1.8 s for the baby GPT, a twentieth of its whole training run on 2 cores.
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return graphdef, init.lower().compile(compiler_options=options)(), shardings


def make_sharded_train_step(
    graphdef,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: str | Rules,
    state_shardings: dict,
    *,
    z_loss: float = 0.0,
    grad_accum_steps: int = 1,
    dropout: bool = False,
    pipeline: PipelineConfig | None = None,
):
    """`trainer.make_train_step`'s step, jitted with the train state's and the batch's shardings.

    The rules are installed while the step is traced, so the model's `constrain` calls become
    `with_sharding_constraint`s; the state is donated, as in the single-device step. With
    `pipeline`, the layer stack runs as a pipeline over the mesh's `pipeline` axis
    (parallel/pipeline.py; the rules must map `layers` to it, e.g. preset "pp_dp_tp").

    Returns:
      step(state, batch, key) -> (state, metrics); metrics are replicated.
    """
    step_fn = trainer.make_train_step(
        graphdef, optimizer, z_loss, grad_accum_steps, dropout, jit=False
    )

    if pipeline is not None:
        check_rules(pipeline, mesh, rules)  # fail here, not at the first call

    def sharded_step(state, batch, key):
        with use_rules(mesh, rules), use_pipeline(pipeline, mesh, rules):
            return step_fn(state, batch, key)

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        sharded_step,
        in_shardings=(state_shardings, batch_sharding(mesh, rules), replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
