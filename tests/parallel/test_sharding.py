"""Tests for parallel/sharding.py: the rules table, train-state shardings, activation hooks.

These run on the one local device; tests/parallel/test_sharded_train.py checks real shards on
8 fake devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

from models import layers
from models.config import ModelConfig
from parallel.mesh import make_mesh
from parallel.sharding import PRESETS, logical_to_spec, train_state_shardings, use_rules
from train import trainer

SIZES = {"pipeline": 1, "data": 2, "fsdp": 4, "tensor": 2}


@pytest.mark.parametrize(
    "rules, logical, shape, expected",
    [
        # Parameters.
        ("dp", ("layers", "embed", "heads", "head_dim"), None, P()),
        ("fsdp", ("layers", "embed", "heads", "head_dim"), None, P(None, "fsdp")),
        ("tp", ("layers", "embed", "heads", "head_dim"), None, P(None, None, "tensor")),
        (
            "fsdp_tp",
            ("layers", "heads", "head_dim", "embed"),
            None,
            P(None, "tensor", None, "fsdp"),
        ),
        ("fsdp_tp", ("vocab", "embed"), None, P("tensor", "fsdp")),
        ("fsdp_tp", ("layers", "norm"), None, P()),
        # MQA: one KV head does not split over tensor=2, so it is replicated (as in Megatron).
        ("tp", ("embed", "kv_heads", "head_dim"), (32, 1, 8), P()),
        ("tp", ("embed", "kv_heads", "head_dim"), (32, 2, 8), P(None, "tensor")),
        # Activations: the batch takes data and fsdp, so embed cannot use fsdp again.
        ("fsdp_tp", ("batch", "seq", "embed"), None, P(("data", "fsdp"))),
        ("fsdp_tp", ("batch", "seq", "mlp"), None, P(("data", "fsdp"), None, "tensor")),
        ("dp_tp", ("batch", "seq", "heads", "head_dim"), None, P(("data", "fsdp"), None, "tensor")),
        # A batch of 2 divides data=2 but not data*fsdp=8.
        ("fsdp", ("batch", "seq"), (2, 16), P("data")),
    ],
)
def test_logical_to_spec(rules, logical, shape, expected):
    assert logical_to_spec(logical, rules, SIZES, shape) == expected


def test_size_one_axes_are_left_out():
    sizes = {"pipeline": 1, "data": 8, "fsdp": 1, "tensor": 1}
    assert logical_to_spec(("batch", "seq", "embed"), "fsdp_tp", sizes) == P("data")
    assert logical_to_spec(("embed", "mlp"), "fsdp_tp", sizes) == P()


def test_rule_errors():
    with pytest.raises(ValueError, match="unknown sharding preset 'zero3'"):
        logical_to_spec(("embed",), "zero3", SIZES)
    with pytest.raises(ValueError, match="names an axis not in the mesh"):
        logical_to_spec(("embed",), (("embed", "expert"),), SIZES)


def test_presets_never_use_a_mesh_axis_twice_for_one_name():
    for name, rules in PRESETS.items():
        logical = [rule[0] for rule in rules]
        assert len(logical) == len(set(logical)), name


@pytest.fixture(scope="module")
def tiny_state():
    cfg = ModelConfig(
        vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, mlp_dim=64, max_seq_len=32
    )
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    return jax.eval_shape(lambda: trainer.init_train_state(cfg, optimizer, 0))


def test_train_state_shardings_follow_params(tiny_state):
    graphdef, state = tiny_state
    mesh = make_mesh()
    shardings = train_state_shardings(graphdef, state, mesh, "fsdp_tp")
    assert jax.tree.structure(shardings) == jax.tree.structure(state)
    # One local device: every mesh axis has size 1, so every spec is empty; the structure and
    # the parameter-to-moment matching are what is checked here.
    adam = shardings["opt_state"][1][0]
    params = shardings["params"]
    assert adam.mu["blocks"]["attn"]["q_proj"] is params["blocks"]["attn"]["q_proj"]
    assert adam.nu["lm_head"] is params["lm_head"]
    assert adam.count.spec == P()
    assert shardings["step"].spec == P()


def test_use_rules_installs_and_removes_the_constraint(monkeypatch):
    # One local device: jax drops trivial constraints, so record the calls instead.
    calls = []

    def record(x, sharding):
        calls.append((x.shape, sharding))
        return x

    monkeypatch.setattr(jax.lax, "with_sharding_constraint", record)
    mesh = make_mesh()
    x = jnp.ones((4, 8, 32))
    assert layers.constrain(x, ("batch", "seq", "embed")) is x
    assert calls == []
    with use_rules(mesh, "fsdp"):
        assert len(layers._ACTIVATION_CONSTRAINT) == 1
        layers.constrain(x, ("batch", "seq", "embed"))
    assert [(shape, s.mesh, s.spec) for shape, s in calls] == [((4, 8, 32), mesh, P())]
    assert layers._ACTIVATION_CONSTRAINT == []
    with pytest.raises(RuntimeError), use_rules(mesh, "fsdp"):
        raise RuntimeError("the rules are removed on errors too")
    assert layers._ACTIVATION_CONSTRAINT == []


def test_moments_nested_under_dict_keys_still_follow_params(tiny_state):
    # An optimizer state such as {"ema": params-like}: the parameter's path is a suffix of a
    # longer path of dict keys. A scalar beside it stays replicated.
    graphdef, state = tiny_state
    opt_state = {"ema": state["params"], "decay": jax.ShapeDtypeStruct((), jnp.float32)}
    shardings = train_state_shardings(
        graphdef, {**state, "opt_state": opt_state}, make_mesh(), "fsdp"
    )
    params = shardings["params"]
    assert (
        shardings["opt_state"]["ema"]["blocks"]["mlp"]["up_proj"]
        is params["blocks"]["mlp"]["up_proj"]
    )
    assert shardings["opt_state"]["decay"].spec == P()
