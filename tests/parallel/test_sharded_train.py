"""Sharded == unsharded: one train step under DP, FSDP, TP x DP and FSDP x TP on 8 CPU devices.

`sharded_step_check.py` runs every case in one subprocess with 8 fake CPU devices (one jax
start, one unsharded reference per model); the tests here check its JSON.
"""

from __future__ import annotations

import json

import pytest

# (model, rules preset, mesh config, gradient accumulation steps)
CASES = [
    ("llama", "dp", {"data": 8}, 1),
    ("llama", "fsdp", {"fsdp": 8}, 1),
    ("llama", "tp", {"data": 4, "tensor": 2}, 1),
    ("llama", "fsdp_tp", {"fsdp": 4, "tensor": 2}, 1),
    ("gpt2", "fsdp_tp", {"fsdp": 4, "tensor": 2}, 1),  # biases, tied embeddings, learned positions
    ("llama", "dp_tp", {"data": 4, "tensor": 2}, 2),  # micro-batches of 4 over data=4
]

# Device 0's shard of a few parameters (and of Adam's moment of each, which must follow it).
# Tiny shapes: L=2 layers, D=32 embed, N=4 heads, K=2 kv heads, H=8 head_dim, F=64 mlp, V=64.
FULL = {
    "blocks/attn/q_proj": [2, 32, 4, 8],  # [L, D, N, H]
    "blocks/attn/k_proj": [2, 32, 2, 8],  # [L, D, K, H]
    "blocks/attn/o_proj": [2, 4, 8, 32],  # [L, N, H, D]
    "blocks/mlp/up_proj": [2, 32, 64],  # [L, D, F]
    "blocks/mlp/down_proj": [2, 64, 32],  # [L, F, D]
    "blocks/attn_norm/scale": [2, 32],  # [L, D] "norm": replicated by every preset
    "embed/embedding": [64, 32],  # [V, D]
    "lm_head": [32, 64],  # [D, V]
}
EXPECTED_SHARDS = {
    "dp": FULL,
    "fsdp": {  # embed / 8
        **FULL,
        "blocks/attn/q_proj": [2, 4, 4, 8],
        "blocks/attn/k_proj": [2, 4, 2, 8],
        "blocks/attn/o_proj": [2, 4, 8, 4],
        "blocks/mlp/up_proj": [2, 4, 64],
        "blocks/mlp/down_proj": [2, 64, 4],
        "embed/embedding": [64, 4],
        "lm_head": [4, 64],
    },
    "tp": {  # heads, kv_heads, mlp, vocab / 2
        **FULL,
        "blocks/attn/q_proj": [2, 32, 2, 8],
        "blocks/attn/k_proj": [2, 32, 1, 8],
        "blocks/attn/o_proj": [2, 2, 8, 32],
        "blocks/mlp/up_proj": [2, 32, 32],
        "blocks/mlp/down_proj": [2, 32, 32],
        "embed/embedding": [32, 32],
        "lm_head": [32, 32],
    },
    "fsdp_tp": {  # embed / 4 and heads, kv_heads, mlp, vocab / 2
        **FULL,
        "blocks/attn/q_proj": [2, 8, 2, 8],
        "blocks/attn/k_proj": [2, 8, 1, 8],
        "blocks/attn/o_proj": [2, 2, 8, 8],
        "blocks/mlp/up_proj": [2, 8, 32],
        "blocks/mlp/down_proj": [2, 32, 8],
        "embed/embedding": [32, 8],
        "lm_head": [8, 32],
    },
}
GPT2_EXTRA = {  # 4 KV heads (MHA), learned positions [T, D], biases
    "blocks/attn/k_proj": [2, 8, 2, 8],
    "pos_embed": [32, 8],
    "blocks/attn/q_bias": [2, 2, 8],
    "blocks/mlp/up_bias": [2, 32],
}


def case_id(case) -> str:
    model, rules, mesh, grad_accum_steps = case
    return f"{model}/{rules}/{json.dumps(mesh, sort_keys=True)}/accum{grad_accum_steps}"


@pytest.fixture(scope="module")
def results(run_sharded_check) -> dict:
    return run_sharded_check({"cases": CASES})


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_one_step_matches_unsharded(results, case):
    r = results[case_id(case)]
    assert r["mesh"] == {"pipeline": 1, "data": 1, "fsdp": 1, "tensor": 1, **case[2]}
    assert r["finite"]
    assert r["loss"] == pytest.approx(r["reference_loss"], rel=1e-5)
    assert r["init_err"] < 1e-6  # initialised straight into shards: the same values
    # Adam's mu after one step is 0.1 * the clipped gradient: this compares the gradients.
    assert r["grad_err"] < 1e-5
    assert r["params_err"] < 1e-5
    # The update alone (new - old, ~lr) is computed from parameters of magnitude ~1, whose
    # float32 spacing (1.2e-7) is ~1e-5 of the update: a looser bound for rounding, not logic.
    assert r["update_err"] < 1e-4


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_shardings_follow_the_rules(results, case):
    model, rules = case[:2]
    r = results[case_id(case)]
    expected = dict(EXPECTED_SHARDS["tp" if rules == "dp_tp" else rules])
    if model == "gpt2":
        expected.pop("lm_head")  # tied to the embedding
        expected.update(GPT2_EXTRA)
    for name, shape in expected.items():
        assert r["param_shards"][name] == shape, name
        assert r["mu_shards"][name] == shape, f"Adam mu of {name}"
    assert r["updated_param_shards"] == r["param_shards"]  # the step keeps the layout
    assert r["step_replicated"]
    # Activations: embeddings, q, mlp hidden and block outputs, logits (scan body traced once).
    assert r["num_constraints"] >= 5
