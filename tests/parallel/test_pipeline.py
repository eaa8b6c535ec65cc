"""Pipeline parallelism (parallel/pipeline.py): schedules equal the plain layer scan.

On one device the stages run unsharded (`num_stages` given), which checks the schedules'
bookkeeping cheaply; `sharded_step_check.py` then runs one train step with 8 fake CPU devices
under PP=2 x DP=2 x TP=2 and PP=4 (GPipe and circular) against the unsharded step.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh

from models.config import ModelConfig
from models.decoder import Decoder
from parallel.mesh import MESH_AXES
from parallel.pipeline import (
    PipelineConfig,
    bubble_fraction,
    check,
    check_rules,
    num_iterations,
    use_pipeline,
)

# ------------------------------------------------------------------------------------------------
# One device: the schedule's bookkeeping.


def test_bubble_fraction():
    assert num_iterations(4, 8) == 11 and num_iterations(4, 8, repeats=2) == 19
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)  # GPipe: (S-1) / (M+S-1)
    assert bubble_fraction(4, 8, repeats=2) == pytest.approx(3 / 19)
    assert bubble_fraction(1, 8) == 0.0
    # More microbatches shrink the bubble; so do more repeats.
    assert bubble_fraction(4, 32) < bubble_fraction(4, 8) and bubble_fraction(4, 8, 4) < 3 / 19


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: PipelineConfig(4, schedule="1f1b"), "schedule='1f1b'"),
        (lambda: PipelineConfig(4, repeats=2), "gpipe schedule has repeats=1, got 2"),
        (lambda: PipelineConfig(0), "num_microbatches=0"),
        (lambda: check(PipelineConfig(2), 4, 6, 8), "num_layers=6 is not divisible by num_st"),
        (lambda: check(PipelineConfig(3), 2, 4, 8), "batch size 8 is not divisible by num_mi"),
        (
            lambda: check(PipelineConfig(2, "circular", 2), 4, 8, 8),
            "needs num_microbatches=2 >= num_stages=4",
        ),
        (
            lambda: check_rules(PipelineConfig(2), AbstractMesh((2, 1, 1, 4), MESH_AXES), "tp"),
            "pipeline=2 needs a rule 'layers' -> 'pipeline'",
        ),
        (
            lambda: check_rules(
                PipelineConfig(2, num_stages=4), AbstractMesh((2, 1, 1, 4), MESH_AXES), "pp"
            ),
            "num_stages=4 differs from the mesh's pipeline axis",
        ),
    ],
)
def test_errors_name_the_values(make, message):
    with pytest.raises(ValueError, match=message):
        make()


CFG = ModelConfig(
    vocab_size=64, num_layers=4, embed_dim=32, num_heads=4, mlp_dim=64, max_seq_len=16,
    num_kv_heads=2,
)  # fmt: skip


@pytest.fixture(scope="module")
def model_and_batch():
    graphdef, params = nnx.split(Decoder(CFG, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (8, 16)), jnp.int32)
    # Packed rows: a different split point per row, so a row given another's segments differs.
    split = rng.integers(2, 14, (8, 1))
    positions = np.arange(16)[None, :].repeat(8, 0)
    segment_ids = jnp.asarray(np.where(positions < split, 1, 2), jnp.int32)
    positions = jnp.asarray(np.where(positions < split, positions, positions - split), jnp.int32)
    inputs = (tokens, positions, segment_ids)
    return graphdef, params, inputs, loss_and_grads(graphdef, params, inputs, None)


def loss_and_grads(graphdef, params, inputs, config):
    tokens, positions, segment_ids = inputs

    def loss(params):
        with use_pipeline(config):
            model = nnx.merge(graphdef, params)
            # A dropout key with rate 0 routes keys through the pipeline but changes nothing.
            logits = model(tokens, positions, segment_ids, dropout_key=jax.random.key(3))
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * jnp.arange(16))

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize(
    "config",
    [
        PipelineConfig(8, "circular", repeats=2, num_stages=2),  # M > S: results wait a round
        # Fewer microbatches than stages: fine for GPipe.
        pytest.param(PipelineConfig(2, num_stages=4), marks=pytest.mark.slow),
        pytest.param(PipelineConfig(4, num_stages=2), marks=pytest.mark.slow),
        pytest.param(PipelineConfig(2, "circular", 2, num_stages=2), marks=pytest.mark.slow),
    ],
    ids=str,
)
def test_pipeline_equals_the_layer_scan(model_and_batch, config):
    graphdef, params, inputs, (ref_loss, ref_grads) = model_and_batch
    got_loss, got_grads = loss_and_grads(graphdef, params, inputs, config)
    assert float(got_loss) == pytest.approx(float(ref_loss), rel=1e-6)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    for got, ref in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(got, ref, atol=1e-6 * scale)


# ------------------------------------------------------------------------------------------------
# 8 fake devices: one train step, sharded == unsharded.

PP2_DP2_TP2 = ("llama8", "pp_dp_tp", {"pipeline": 2, "data": 2, "tensor": 2}, 1, {"num_microbatches": 2})  # fmt: skip
PP4_GPIPE = ("llama8", "pp", {"pipeline": 4, "data": 2}, 1, {"num_microbatches": 4})
PP4_CIRCULAR = (
    "llama8", "pp", {"pipeline": 4, "data": 2}, 1,
    {"num_microbatches": 4, "schedule": "circular", "repeats": 2},
)  # fmt: skip
CASES = [PP2_DP2_TP2, PP4_GPIPE, PP4_CIRCULAR]

# Device 0's shards; tiny shapes: L=8 layers, D=32, N=4 heads, K=2 kv heads, H=8, F=64, V=64.
EXPECTED_SHARDS = {
    "pp_dp_tp": {  # layers / 2 (pipeline) and heads, kv_heads, mlp, vocab / 2 (tensor)
        "blocks/attn/q_proj": [4, 32, 2, 8],
        "blocks/attn/k_proj": [4, 32, 1, 8],
        "blocks/attn/o_proj": [4, 2, 8, 32],
        "blocks/mlp/up_proj": [4, 32, 32],
        "blocks/mlp/down_proj": [4, 32, 32],
        "blocks/attn_norm/scale": [4, 32],
        "embed/embedding": [32, 32],
        "lm_head": [32, 32],
    },
    "pp": {  # layers / 4; the rest replicated
        "blocks/attn/q_proj": [2, 32, 4, 8],
        "blocks/attn/k_proj": [2, 32, 2, 8],
        "blocks/attn/o_proj": [2, 4, 8, 32],
        "blocks/mlp/up_proj": [2, 32, 64],
        "blocks/mlp/down_proj": [2, 64, 32],
        "blocks/attn_norm/scale": [2, 32],
        "embed/embedding": [64, 32],
        "lm_head": [32, 64],
    },
}


def case_id(case) -> str:
    model, rules, mesh, accum, pipeline = case
    return f"{model}/{rules}/{json.dumps(mesh, sort_keys=True)}/accum{accum}/" + json.dumps(
        pipeline, sort_keys=True
    )


@pytest.fixture(scope="module")
def results(run_sharded_check) -> dict:
    return run_sharded_check({"cases": [list(case) for case in CASES]})


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_one_pipelined_step_matches_unsharded(results, case):
    r = results[case_id(case)]
    assert r["mesh"] == {"pipeline": 1, "data": 1, "fsdp": 1, "tensor": 1, **case[2]}
    assert r["finite"]
    assert r["loss"] == pytest.approx(r["reference_loss"], rel=1e-5)
    assert r["init_err"] < 1e-6
    assert r["grad_err"] < 1e-5  # Adam's mu after one step: 0.1 * the clipped gradient
    assert r["params_err"] < 1e-5
    assert r["update_err"] < 1e-4  # see test_sharded_train.py


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_pipelined_shardings_follow_the_rules(results, case):
    r = results[case_id(case)]
    for name, shape in EXPECTED_SHARDS[case[1]].items():
        assert r["param_shards"][name] == shape, name
        assert r["mu_shards"][name] == shape, f"Adam mu of {name}"
    assert r["updated_param_shards"] == r["param_shards"]
    # Activations move between stages by collective permutes.
    assert r["collectives"]["collective-permute"] >= 1


def test_gpipe_keeps_each_stage_weights_on_its_devices(results):
    # With stages over `pipeline` and data over `data` nothing gathers weights: each device
    # runs its own layers. (The circular schedule's stage j holds layers that are not one
    # contiguous run of the stored [L] axis, so it does gather them; docs/parallelism.md.)
    assert results[case_id(PP4_GPIPE)]["collectives"]["all-gather"] == 0
    assert results[case_id(PP4_CIRCULAR)]["collectives"]["all-gather"] > 0
