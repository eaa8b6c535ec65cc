"""Pipeline parallelism over the mesh's `pipeline` axis: GPipe and circular schedules.

The stacked [L] block parameters are viewed as [R, S, L/(R*S)]: S stages (the `pipeline` mesh
axis), each holding R chunks of consecutive layers (R=1: GPipe, Huang et al. 2019; R>1: the
circular / interleaved schedule of Narayanan et al. 2021, section 2.2, where a microbatch goes
round the ring of stages R times). The batch is split into M microbatches; one jitted
`lax.scan` runs M*R + S - 1 iterations, and in each every stage applies its current chunk to
its current microbatch at once: a `jax.vmap` over the stage axis, whose inputs and weights are
sharded over `pipeline`, after which the activations shift one stage on (a `jnp.concatenate`
that XLA's partitioner lowers to a collective permute).

Why vmap-over-stages and not `shard_map` + `ppermute`: the rest of this package is GSPMD (Auto
mesh axes, `with_sharding_constraint` from the rules table). The vmapped formulation (MaxText's
and praxis') keeps it so: `vmap(..., spmd_axis_name="pipeline")` turns the model's own
activation constraints into constraints with the stage axis on `pipeline`, so data, FSDP and
tensor parallelism inside a stage work unchanged, with no manual axes to thread through.

Backward: `jax.grad` of the pipelined forward. Autodiff of a scan runs the whole forward, then
the whole backward in reverse, which is exactly GPipe's schedule (the bubble is paid twice,
activations of all M microbatches are stashed). 1F1B is not expressible this way; see
docs/parallelism.md. Bubble fraction: each stage idles S - 1 of the M*R + S - 1 iterations.

    step = make_sharded_train_step(..., pipeline=PipelineConfig(num_microbatches=8))
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from models import layers
from parallel.sharding import Rules, get_rules, named_sharding

SCHEDULES = ("gpipe", "circular")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How the layer stack is pipelined.

    Attributes:
      num_microbatches: M; the batch (per gradient-accumulation step) must divide by it.
      schedule: "gpipe" (one chunk per stage) or "circular" (`repeats` chunks per stage).
      repeats: R, chunks per stage; 1 for GPipe. The circular schedule needs M >= S.
      num_stages: S; None means the size of the mesh's `pipeline` axis.
    """

    num_microbatches: int
    schedule: str = "gpipe"
    repeats: int = 1
    num_stages: int | None = None

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"pipeline schedule={self.schedule!r}; use one of {SCHEDULES}")
        if self.num_microbatches < 1 or self.repeats < 1:
            raise ValueError(
                f"num_microbatches={self.num_microbatches} and repeats={self.repeats} must be >= 1"
            )
        if self.schedule == "gpipe" and self.repeats != 1:
            raise ValueError(f"the gpipe schedule has repeats=1, got {self.repeats}")

    def stages(self, mesh: Mesh | None) -> int:
        if self.num_stages is not None:
            return self.num_stages
        return 1 if mesh is None else mesh.shape.get("pipeline", 1)


def num_iterations(num_stages: int, num_microbatches: int, repeats: int = 1) -> int:
    """Pipeline steps (each: every stage runs one chunk on one microbatch)."""
    return num_microbatches * repeats + num_stages - 1


def bubble_fraction(num_stages: int, num_microbatches: int, repeats: int = 1) -> float:
    """The fraction of stage-iterations spent idle: (S - 1) / (M*R + S - 1).

    GPipe: (S - 1) / (M + S - 1). The circular schedule's iterations are R times shorter (a chunk
    is L / (S*R) layers), so the same S - 1 idle iterations cost R times less time.
    """
    return (num_stages - 1) / num_iterations(num_stages, num_microbatches, repeats)


def check(config: PipelineConfig, num_stages: int, num_layers: int, batch: int) -> None:
    """Raises ValueError, naming the values, if the pipeline cannot run this model and batch."""
    s, r, m = num_stages, config.repeats, config.num_microbatches
    if num_layers % (s * r):
        raise ValueError(
            f"num_layers={num_layers} is not divisible by num_stages={s} * repeats={r}"
        )
    if batch % m:
        raise ValueError(f"batch size {batch} is not divisible by num_microbatches={m}")
    if r > 1 and m < s:
        raise ValueError(
            f"the circular schedule needs num_microbatches={m} >= num_stages={s}: a microbatch "
            "must leave the last stage before stage 0 needs it again"
        )


def _to_microbatches(a: jax.Array | None, m: int) -> jax.Array | None:
    """[B, ...] -> [M, B/M, ...]; microbatch i is rows i, i+M, ... so that a batch split
    contiguously over `data` stays split the same way inside every microbatch."""
    if a is None:
        return None
    return a.reshape(a.shape[0] // m, m, *a.shape[1:]).swapaxes(0, 1)


def _from_microbatches(a: jax.Array) -> jax.Array:
    return a.swapaxes(0, 1).reshape(-1, *a.shape[2:])


def run_pipeline(
    layer,
    block_state,
    x: jax.Array,
    dropout_keys: jax.Array | None,
    batch_args: tuple,
    config: PipelineConfig,
    mesh: Mesh | None = None,
    rules: str | Rules | None = None,
) -> jax.Array:
    """Runs the stacked layers over x as a pipeline; equals `scan_blocks` without a cache.

    Args:
      layer: (x, (block state, None, dropout key), batch_args) -> (x, None), one layer.
      block_state: the stacked blocks' nnx state, every leaf [L, ...].
      x: [B, T, D] activations.
      dropout_keys: [L] keys or None. A microbatch's key is the layer's key folded with the
        microbatch index, so dropout masks differ from the unpipelined model's.
      batch_args: (positions [B, T], segment_ids [B, T] or None, shared {name: [B, ...]}).
      config: the schedule.
      mesh, rules: shard stages over `pipeline` and activations by the rules; None: no
        constraints (one device, for tests).

    Returns:
      [B, T, D].
    """
    positions, segment_ids, shared = batch_args
    if set(shared) - {"prefix_len"}:
        raise ValueError(
            f"pipeline parallelism runs decoder-only stacks; got layer inputs {sorted(shared)}"
        )
    variables = jax.tree.leaves(block_state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    logical = [v.get_metadata().get("logical_axes") for v in variables]
    leaves, treedef = jax.tree.flatten(block_state)
    s, r, m = config.stages(mesh), config.repeats, config.num_microbatches
    num_layers = leaves[0].shape[0]
    check(config, s, num_layers, x.shape[0])
    chunk = num_layers // (s * r)
    sharded = mesh is not None and mesh.shape.get("pipeline", 1) > 1

    def constrain(a, axes):
        if mesh is None:
            return a
        return jax.lax.with_sharding_constraint(a, named_sharding(mesh, rules, axes, a.shape))

    # Layer l = (i*S + j)*chunk + c runs as chunk i of stage j: [L] -> [R, S, chunk].
    def split(a):
        return a.reshape(r, s, chunk, *a.shape[1:])

    stacked = [split(a) for a in leaves]
    keys = None if dropout_keys is None else split(dropout_keys)
    inputs = constrain(_to_microbatches(x, m), (None, "batch", "seq", "embed"))
    aux = jax.tree.map(lambda a: _to_microbatches(a, m), (positions, segment_ids, shared))

    def stage(params, stage_keys, h, stage_aux, microbatch):
        """One stage: its chunk of layers ([chunk, ...] params) on one microbatch [B/M, T, D]."""
        if stage_keys is not None:
            stage_keys = jax.vmap(jax.random.fold_in, (0, None))(stage_keys, microbatch)

        def body(h, per_layer):
            params, key = per_layer
            h, _ = layer(h, (jax.tree.unflatten(treedef, params), None, key), stage_aux)
            return h, None

        return jax.lax.scan(body, h, (params, stage_keys))[0]

    stage_ids = jnp.arange(s)
    vmap_stages = jax.vmap(stage, spmd_axis_name="pipeline" if sharded else None)

    def current_chunk(a, index):
        """[R, S, chunk, ...] -> [S, chunk, ...]: stage j's chunk index[j]."""
        if r == 1:
            return a[0]
        return jax.vmap(lambda per_stage, i: per_stage[i], in_axes=(1, 0))(a, index)

    def iteration(carry, t):
        previous, loop = carry  # [S, B/M, T, D] last outputs; [M, B/M, T, D] last-stage outputs
        work = t - stage_ids  # stage j works on item t - j: microbatch (t-j) % M, repeat // M
        microbatch = jnp.mod(work, m)
        repeat = jnp.clip(work // m, 0, r - 1)
        # Stage 0 takes a fresh microbatch in the first round, later what the last stage left.
        first = jnp.where(t < m, inputs[jnp.minimum(t, m - 1)], loop[jnp.mod(t, m)])
        h = jnp.concatenate([first[None], previous[:-1]], axis=0)
        h = constrain(h, ("layers", "batch", "seq", "embed"))
        params = [
            constrain(current_chunk(a, repeat), ("layers", None, *axes[1:]))
            for a, axes in zip(stacked, logical, strict=True)
        ]
        stage_keys = None if keys is None else current_chunk(keys, repeat)
        stage_aux = jax.tree.map(lambda a: a[microbatch], aux)
        out = vmap_stages(params, stage_keys, h, stage_aux, microbatch)
        out = constrain(out, ("layers", "batch", "seq", "embed"))
        # The last stage finished item t - (S-1); before the pipeline fills it has nothing.
        done = t - (s - 1)
        slot = jnp.mod(done, m)
        loop = loop.at[slot].set(jnp.where(done >= 0, out[-1], loop[slot]))
        return (out, constrain(loop, (None, "batch", "seq", "embed"))), None

    start = (jnp.zeros((s, *inputs.shape[1:]), x.dtype), jnp.zeros_like(inputs))
    (_, outputs), _ = jax.lax.scan(iteration, start, jnp.arange(num_iterations(s, m, r)))
    return _from_microbatches(outputs)


@contextlib.contextmanager
def use_pipeline(
    config: PipelineConfig | None, mesh: Mesh | None = None, rules: str | Rules | None = None
) -> Iterator[None]:
    """Within this context, the model's layer stack (`scan_blocks` without a cache) runs as a
    pipeline. Like `use_rules`, enter it inside the traced function. None: a no-op."""
    if config is None:
        yield
        return
    if mesh is not None:
        check_rules(config, mesh, rules)

    def run(layer, block_state, x, dropout_keys, batch_args):
        return run_pipeline(layer, block_state, x, dropout_keys, batch_args, config, mesh, rules)

    layers._LAYER_STACK_RUNNER.append(run)
    try:
        yield
    finally:
        layers._LAYER_STACK_RUNNER.remove(run)


def check_rules(config: PipelineConfig, mesh: Mesh, rules: str | Rules) -> None:
    """The stages must be the `pipeline` axis and the rules must put `layers` on it."""
    size = mesh.shape.get("pipeline", 1)
    if config.stages(mesh) != size:
        raise ValueError(
            f"num_stages={config.num_stages} differs from the mesh's pipeline axis ({size})"
        )
    target = dict(get_rules(rules)).get("layers")
    if size > 1 and target != "pipeline" and "pipeline" not in (target or ()):
        raise ValueError(
            f"pipeline={size} needs a rule 'layers' -> 'pipeline' (e.g. preset 'pp_dp_tp'), "
            f"got layers -> {target!r}"
        )
