# %% [markdown]
# # Sharding: meshes, rules, and one train step under each strategy
#
# `parallel/` splits a model over many devices without touching model code. Every parameter
# and main activation names its axes (`("embed", "mlp")`, `("batch", "seq", "embed")`); a
# **rules table** maps those names to the axes of a device **mesh**
# (`pipeline`, `data`, `fsdp`, `tensor`). Change the table and the same step runs data
# parallel, fully sharded (ZeRO-3), tensor parallel (Megatron), pipelined, or a mix.
#
# This notebook runs on a CPU: it asks XLA for 8 fake CPU devices, which must happen before
# jax is imported. Each section takes a few seconds (one compilation per strategy).

# %%
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import importlib.util
import pathlib
import sys

# Not pip-installed and run from notebooks/? Import the packages from the checkout above.
if importlib.util.find_spec("models") is None:
    sys.path.insert(0, str(pathlib.Path.cwd().resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from models.config import ModelConfig
from models.layers import constrain
from parallel import PRESETS, bubble_fraction, make_mesh, use_rules
from parallel.pipeline import PipelineConfig
from parallel.train import (
    abstract_train_state,
    init_sharded_train_state,
    make_sharded_train_step,
    shard_batch,
)
from train import trainer
from train.defaults import base_config
from train.optimizer import make_optimizer

# XLA:CPU compiles each strategy's step in a few seconds; most optimisations only slow that.
jax.config.update("jax_disable_most_optimizations", True)
print(jax.devices())

# %% [markdown]
# ## Meshes
#
# `make_mesh` takes sizes for some axes; `-1` means "the rest", missing axes are 1. The rules
# presets say which logical names go on which mesh axis.

# %%
for config in [{"data": -1}, {"fsdp": -1, "tensor": 2}, {"pipeline": 2, "data": 2, "tensor": 2}]:
    print(f"{str(config):42s} -> {dict(make_mesh(config).shape)}")
print()
for name, rules in PRESETS.items():
    print(f"{name:10s} {dict(rules)}")

# %% [markdown]
# ## Parameter shardings
#
# A tiny Llama-style model (4 layers, D=32, 4 heads, F=64, V=64) initialised straight into its
# shards. Under FSDP x TP (`fsdp=4, tensor=2`) the LM head [D, V] is split over `fsdp` on D
# and over `tensor` on V: each device holds an [8, 32] block. Under pipeline x TP the stacked
# MLP weights [L, D, F] are split over `pipeline` on L (layers 0-1 on stage 0, 2-3 on stage 1)
# and over `tensor` on F.

# %%
cfg = ModelConfig(
    vocab_size=64, num_layers=4, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
    max_seq_len=32,
)  # fmt: skip
opt_config = base_config().optimizer
# eps=1e-3: with the default 1e-8 Adam's g / (|g| + eps) magnifies float32 rounding of tiny
# gradients, and sharded and unsharded parameters would differ visibly after one step.
opt_config.learning_rate, opt_config.warmup_steps, opt_config.eps = 1e-2, 0, 1e-3
optimizer = make_optimizer(opt_config, num_steps=100)[0]

mesh = make_mesh({"fsdp": 4, "tensor": 2})
graphdef, state, shardings = init_sharded_train_state(cfg, optimizer, 0, mesh, "fsdp_tp")
lm_head = state["params"]["lm_head"]
print("lm_head", lm_head.shape, lm_head.sharding.spec)
jax.debug.visualize_array_sharding(lm_head)


# %%
def show_first_two_dims(name, leaf):
    """visualize_array_sharding draws 2-D arrays; this draws the first two dims' layout."""
    spec = tuple(leaf.sharding.spec) + (None,) * leaf.ndim
    print(name, leaf.shape, leaf.sharding.spec)
    sharding = NamedSharding(leaf.sharding.mesh, PartitionSpec(*spec[:2]))
    jax.debug.visualize_sharding(leaf.shape[:2], sharding)


# Shapes and shardings only (jax.eval_shape underneath): nothing is allocated or compiled.
pp_mesh = make_mesh({"pipeline": 2, "data": 2, "tensor": 2})
_, pp_state, _ = abstract_train_state(cfg, optimizer, pp_mesh, "pp_dp_tp")
up_proj = pp_state["params"]["blocks"]["mlp"]["up_proj"]  # [L, D, F]
show_first_two_dims("up_proj [L, D, F] (first two dims)", up_proj)
print("one device's shard:", up_proj.sharding.shard_shape(up_proj.shape))

# %% [markdown]
# Per-device shapes of a few parameters under each preset, on 8 devices:

# %%
STRATEGIES = {
    "dp": {"data": 8},
    "fsdp": {"fsdp": 8},
    "dp_tp": {"data": 4, "tensor": 2},
    "fsdp_tp": {"fsdp": 4, "tensor": 2},
    "pp_dp_tp": {"pipeline": 2, "data": 2, "tensor": 2},
}
names = [("blocks", "attn", "q_proj"), ("blocks", "mlp", "up_proj"), ("lm_head",)]
print(f"{'':10s}" + "".join(f"{'/'.join(n):>22s}" for n in names))
for rules, mesh_config in STRATEGIES.items():
    m = make_mesh(mesh_config)
    _, st, _ = abstract_train_state(cfg, optimizer, m, rules)
    cells = []
    for n in names:
        leaf = st["params"]
        for key in n:
            leaf = leaf[key]
        cells.append(str(leaf.sharding.shard_shape(leaf.shape)))
    print(f"{rules:10s}" + "".join(f"{c:>22s}" for c in cells))

# %% [markdown]
# ## Activation shardings
#
# Inside `use_rules` the model's `constrain(x, names)` calls become sharding constraints. Here
# the MLP's hidden activation [B, T, F] is named `("batch", "seq", "mlp")`: under FSDP x TP the
# batch goes over `fsdp` (FSDP is data parallelism whose weights are also split) and F over
# `tensor`. We draw its first position, [B, F], for a batch of 32.

# %%
x = jnp.ones((32, 16, 32))
up = state["params"]["blocks"]["mlp"]["up_proj"][0]  # layer 0's [D, F]


@jax.jit
def hidden_at_position_0(x, up):
    with use_rules(mesh, "fsdp_tp"):
        h = constrain(x @ up, ("batch", "seq", "mlp"))
    return h[:, 0, :]


jax.debug.visualize_array_sharding(hidden_at_position_0(x, up))

# %% [markdown]
# ## One train step under each strategy
#
# The same `trainer` step, jitted with each strategy's shardings, against the unsharded step.
# The pipelined strategies split the 4 layers into 2 stages (GPipe) or 2 stages x 2 rounds
# (circular) and the batch of 8 into microbatches; their bubble fraction is the share of
# stage-iterations that idle while the pipeline fills and drains.

# %%
rng = np.random.default_rng(0)
tokens = rng.integers(0, cfg.vocab_size, (8, 17), dtype=np.int32)
batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

graphdef, ref_state = trainer.init_train_state(cfg, optimizer, 0)
ref_step = trainer.make_train_step(graphdef, optimizer, 0.0, 1, False)
ref_state, ref_metrics = ref_step(ref_state, batch, jax.random.key(1))
ref_params = jax.device_get(ref_state["params"])
print(f"{'unsharded':34s} loss {float(ref_metrics['loss']):.6f}")

RUNS = [
    ("dp", {"data": 8}, None),
    ("fsdp", {"fsdp": 8}, None),
    ("fsdp_tp", {"fsdp": 4, "tensor": 2}, None),
    ("pp_dp_tp", {"pipeline": 2, "data": 2, "tensor": 2}, PipelineConfig(4)),
    ("pp_dp_tp", {"pipeline": 2, "data": 2, "tensor": 2}, PipelineConfig(4, "circular", 2)),
]
for rules, mesh_config, pipeline in RUNS:
    m = make_mesh(mesh_config)
    graphdef, st, sh = init_sharded_train_state(cfg, optimizer, 0, m, rules)
    step = make_sharded_train_step(graphdef, optimizer, m, rules, sh, pipeline=pipeline)
    st, metrics = step(st, shard_batch(batch, m, rules), jax.random.key(1))
    got = jax.tree.leaves(jax.device_get(st["params"]))
    err = max(
        float(np.max(np.abs(a - b))) for a, b in zip(got, jax.tree.leaves(ref_params), strict=True)
    )
    name = rules if pipeline is None else f"{rules} {pipeline.schedule}"
    bubble = "" if pipeline is None else f"  bubble {bubble_fraction(2, 4, pipeline.repeats):.2f}"
    print(
        f"{name:34s} loss {float(metrics['loss']):.6f}  max |params - unsharded| {err:.1e}{bubble}"
    )

# %% [markdown]
# Every strategy gives the unsharded step's loss and parameters up to float32 rounding. Memory
# per device for full-size models under each strategy: `experiments/benchmarks/sharding_memory.py`
# and its table in `docs/parallelism.md`.
