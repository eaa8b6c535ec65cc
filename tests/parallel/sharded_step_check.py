"""Runs a train step unsharded and under each requested strategy; prints JSON results.

With "checkpoint_dir", also saves under one mesh and resumes under another. Run by
tests/parallel/test_sharded_*.py in a subprocess, because the fake CPU devices
(`--xla_force_host_platform_device_count=8`) must be set before jax is imported:

    python tests/parallel/sharded_step_check.py \
        '{"cases": [["llama", "tp", {"data": 4, "tensor": 2}, 1]]}'

A case may add a fifth entry, a parallel.pipeline.PipelineConfig as a dict, e.g.
["llama8", "pp_dp_tp", {"pipeline": 2, "data": 2, "tensor": 2}, 1, {"num_microbatches": 2}].
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

# Halves XLA:CPU compile time, most of this script's; both sides of each comparison use it.
jax.config.update("jax_disable_most_optimizations", True)

from models.config import ModelConfig  # noqa: E402
from parallel.mesh import make_mesh  # noqa: E402
from parallel.pipeline import PipelineConfig  # noqa: E402
from parallel.train import (  # noqa: E402
    abstract_train_state,
    init_sharded_train_state,
    make_sharded_train_step,
    shard_batch,
)
from train import trainer  # noqa: E402
from train.checkpoint import Checkpointer  # noqa: E402
from train.defaults import base_config  # noqa: E402
from train.optimizer import make_optimizer  # noqa: E402

TINY = dict(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, mlp_dim=64, max_seq_len=32)
MODELS = {
    # RoPE, RMSNorm, SwiGLU, 2 KV heads, untied head.
    "llama": ModelConfig(
        **TINY, norm="rmsnorm", mlp_activation="swiglu", position="rope", num_kv_heads=2
    ),
    # Learned positions, LayerNorm, GELU, biases, tied embeddings.
    "gpt2": ModelConfig(
        **TINY,
        norm="layernorm",
        mlp_activation="gelu",
        position="learned",
        qkv_bias=True,
        out_bias=True,
        tie_embeddings=True,
    ),
}
# Eight layers: two per stage on PP=4, or two chunks of one on PP=4 with the circular schedule.
MODELS["llama8"] = dataclasses.replace(MODELS["llama"], num_layers=8)


# Communication ops counted in the compiled step's HLO.
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def optimizer():
    # AdamW's step g / (|g| + eps) turns a gradient's rounding error e into an update error of up
    # to lr * e / (4 * eps) where |g| ~ eps: with the default eps=1e-8 that is 1e5 * e, so
    # float32 reduction order alone would move parameters by 1e-4 of their update. eps=1e-3
    # bounds the gain at 2.5 and keeps the comparison tight.
    opt = base_config().optimizer
    opt.learning_rate, opt.warmup_steps, opt.eps = 1e-2, 0, 1e-3
    return make_optimizer(opt, num_steps=100)[0]


def batch(cfg: ModelConfig, seed: int = 0) -> dict:
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (8, 17), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def adam_mu(state):
    """Adam's first moment: after one step, (1 - b1) times the (clipped) gradient."""
    return state["opt_state"][1][0].mu  # chain(clip_by_global_norm, adamw(scale_by_adam, ...))


def run_unsharded(cfg: ModelConfig):
    opt = optimizer()
    graphdef, state = trainer.init_train_state(cfg, opt, seed=0)
    init_params = jax.device_get(state["params"])
    step = trainer.make_train_step(graphdef, opt, 0.0, 1, False)
    state, metrics = step(state, batch(cfg), jax.random.key(1))
    return init_params, jax.device_get(state), float(metrics["loss"])


def max_rel_err(a, b) -> float:
    """max |a - b| over two pytrees, relative to max |b| over the whole tree.

    Relative to the tree, not each leaf: a gradient that is zero in exact arithmetic (a key
    bias: softmax ignores a constant shift of a query's scores) is pure rounding noise.
    """
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    diff = max(float(np.max(np.abs(x - y))) for x, y in pairs)
    return diff / max(float(np.max(np.abs(y))) for y in jax.tree.leaves(b))


def shard_shapes(tree) -> dict[str, list[int]]:
    """The shape of device 0's shard of every leaf, by path ("blocks/attn/q_proj")."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(k.key) for k in path): list(leaf.addressable_shards[0].data.shape)
        for path, leaf in flat
    }


def run_sharded(
    cfg: ModelConfig,
    rules: str,
    mesh_config: dict,
    reference,
    grad_accum_steps: int = 1,
    pipeline: PipelineConfig | None = None,
) -> dict:
    ref_init, ref_state, ref_loss = reference
    opt = optimizer()
    mesh = make_mesh(mesh_config)
    graphdef, state, shardings = init_sharded_train_state(cfg, opt, 0, mesh, rules)
    init_params = jax.device_get(state["params"])
    param_shards, mu_shards = shard_shapes(state["params"]), shard_shapes(adam_mu(state))
    step = make_sharded_train_step(
        graphdef, opt, mesh, rules, shardings, grad_accum_steps=grad_accum_steps, pipeline=pipeline
    )
    args = (state, shard_batch(batch(cfg), mesh, rules), jax.random.key(1))
    # The model's activation constraints, traced into the step under the rules.
    num_constraints = str(jax.make_jaxpr(step)(*args)).count("sharding_constraint")
    compiled = step.lower(*args).compile()  # compiled once, called below
    hlo = compiled.as_text()
    collectives = {op: len(re.findall(rf" {op}(-start)?\(", hlo)) for op in COLLECTIVES}
    state, metrics = compiled(*args)
    host = jax.device_get(state)
    delta = jax.tree.map(np.subtract, host["params"], init_params)
    ref_delta = jax.tree.map(np.subtract, ref_state["params"], ref_init)
    return {
        "mesh": dict(mesh.shape),
        "loss": float(metrics["loss"]),
        "reference_loss": ref_loss,
        "finite": bool(metrics["finite"]),
        "init_err": max_rel_err(init_params, ref_init),
        "grad_err": max_rel_err(adam_mu(host), adam_mu(ref_state)),
        "params_err": max_rel_err(host["params"], ref_state["params"]),
        "update_err": max_rel_err(delta, ref_delta),
        "param_shards": param_shards,
        "mu_shards": mu_shards,
        "updated_param_shards": shard_shapes(state["params"]),
        "step_replicated": state["step"].sharding.is_fully_replicated,
        "num_constraints": num_constraints,
        "collectives": collectives,
    }


def run_resharded_checkpoint(cfg: ModelConfig, directory: str) -> dict:
    """Trains a step under FSDP=8, saves, restores under FSDP=4 x TP=2 and trains on.

    The second step under the new mesh must match the second step under the old one.
    """
    opt = optimizer()
    mesh_a, mesh_b = make_mesh({"fsdp": 8}), make_mesh({"fsdp": 4, "tensor": 2})
    graphdef, state, shardings_a = init_sharded_train_state(cfg, opt, 0, mesh_a, "fsdp")
    step_a = make_sharded_train_step(graphdef, opt, mesh_a, "fsdp", shardings_a)
    first, second = batch(cfg), batch(cfg, seed=1)
    key = jax.random.key(1)
    state, _ = step_a(state, shard_batch(first, mesh_a, "fsdp"), key)
    checkpointer = Checkpointer(directory, async_save=False)
    checkpointer.save(1, state, {}, {})
    checkpointer.wait()
    saved = jax.device_get(state)
    state, metrics_a = step_a(state, shard_batch(second, mesh_a, "fsdp"), key)
    continued_a = jax.device_get(state)

    _, abstract_b, shardings_b = abstract_train_state(cfg, opt, mesh_b, "fsdp_tp")
    restored, _, _ = checkpointer.restore(1, abstract_b)
    checkpointer.close()
    restored_shards = shard_shapes(restored["params"])
    restored_ok = all(
        leaf.sharding == sharding
        for leaf, sharding in zip(
            jax.tree.leaves(restored), jax.tree.leaves(shardings_b), strict=True
        )
    )
    restored_err = max_rel_err(jax.device_get(restored), saved)
    step_b = make_sharded_train_step(graphdef, opt, mesh_b, "fsdp_tp", shardings_b)
    state, metrics_b = step_b(restored, shard_batch(second, mesh_b, "fsdp_tp"), key)
    continued_b = jax.device_get(state)
    return {
        "restored_err": restored_err,
        "restored_shardings_ok": restored_ok,
        "restored_param_shards": restored_shards,
        "step": int(continued_b["step"]),
        "loss_a": float(metrics_a["loss"]),
        "loss_b": float(metrics_b["loss"]),
        "params_err": max_rel_err(continued_b["params"], continued_a["params"]),
        "opt_state_err": max_rel_err(continued_b["opt_state"], continued_a["opt_state"]),
    }


def main(request: dict) -> dict:
    results = {}
    references = {}
    for model, rules, mesh_config, grad_accum_steps, *pipeline in request.get("cases", []):
        cfg = MODELS[model]
        if model not in references:
            references[model] = run_unsharded(cfg)
        pipeline_config = PipelineConfig(**pipeline[0]) if pipeline else None
        # Accumulated steps are compared with the one-shot reference: the same token mean.
        result = run_sharded(
            cfg, rules, mesh_config, references[model], grad_accum_steps, pipeline_config
        )
        mesh_id = json.dumps(mesh_config, sort_keys=True)
        key = f"{model}/{rules}/{mesh_id}/accum{grad_accum_steps}"
        if pipeline:
            key += "/" + json.dumps(pipeline[0], sort_keys=True)
        results[key] = result
    if request.get("batch_error"):
        try:
            shard_batch({"inputs": np.zeros((6, 4), np.int32)}, make_mesh({"data": 8}), "dp")
        except ValueError as e:
            results["batch_error"] = str(e)
    if request.get("checkpoint_dir"):
        results["checkpoint"] = run_resharded_checkpoint(MODELS["llama"], request["checkpoint_dir"])
    return results


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
