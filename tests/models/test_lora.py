"""LoRA: starts identical, trains only adapters, merges exactly, dropout, QLoRA, clear errors.

One tiny base model is built per module and copied (nnx.merge of its state) for each test; one
jitted forward serves them all (a model structure compiles once).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from models.config import ModelConfig
from models.decoder import Decoder
from models.lora import (
    LoRAConfig,
    LoRADense,
    LoRAParam,
    apply_lora,
    lora_modules,
    merge_lora,
    unload_lora,
    unmerge_lora,
)
from models.quantize import QuantData, QuantizedDense, quantize

pytestmark = pytest.mark.usefixtures("jax_compile_cache")

TINY = dict(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, mlp_dim=64, max_seq_len=16)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)


def tiny(**changes) -> ModelConfig:
    return ModelConfig(**{**TINY, "num_kv_heads": 2, "init_std": 0.2, **changes})


@nnx.jit
def forward(model, tokens, dropout_key=None):
    return model(tokens, dropout_key=dropout_key)


@pytest.fixture(scope="module")
def base_model():
    return Decoder(tiny(), rngs=nnx.Rngs(0))


@pytest.fixture
def base(base_model):
    """A fresh copy of the tiny base model (nnx.merge would share its Variables)."""
    return nnx.clone(base_model)


def randomize_b(model, scale=0.3):
    """Nonzero B everywhere, so the adapters change the output."""
    for i, module in enumerate(lora_modules(model).values()):
        shape = module.lora_b[...].shape
        module.lora_b[...] = jax.random.normal(jax.random.key(100 + i), shape) * scale


@pytest.fixture(scope="module")
def base_logits(base_model):
    return np.asarray(forward(nnx.clone(base_model), TOKENS))


def relative(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_starts_identical_to_the_base(base, base_logits):
    apply_lora(base, LoRAConfig(rank=4), nnx.Rngs(1))
    assert len(lora_modules(base)) == 7
    # B = 0, so the adapters add exactly zero; the wrapped model runs q, k and v as three
    # matmuls instead of the base's fused one, which may round differently in the last bit.
    np.testing.assert_allclose(forward(base, TOKENS), base_logits, rtol=1e-5, atol=1e-5)


def test_targets_names_regexes_and_shapes(base):
    model = base
    apply_lora(
        model, LoRAConfig(rank=3, targets=("down_proj", r"blocks/attn/[qo]_proj")), nnx.Rngs(1)
    )
    modules = lora_modules(model)
    assert sorted(modules) == ["blocks/attn/o_proj", "blocks/attn/q_proj", "blocks/mlp/down_proj"]
    # A [L, *in, r], B [L, r, *out]: the contraction split of the stacked base weight.
    assert modules["blocks/attn/q_proj"].lora_a[...].shape == (2, 32, 3)
    assert modules["blocks/attn/q_proj"].lora_b[...].shape == (2, 3, 4, 8)
    assert modules["blocks/attn/o_proj"].lora_a[...].shape == (2, 4, 8, 3)
    assert modules["blocks/attn/o_proj"].lora_b[...].shape == (2, 3, 32)
    a = modules["blocks/attn/o_proj"].lora_a
    assert a.get_metadata()["logical_axes"] == ("layers", "heads", "head_dim", None)


def test_scaling():
    assert LoRAConfig(rank=16, alpha=32).scale == 2.0
    assert LoRAConfig(rank=16, alpha=32, rslora=True).scale == 8.0


def test_only_adapters_get_gradients_and_change(base):
    model = base
    apply_lora(model, LoRAConfig(rank=4), nnx.Rngs(1))
    base = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Not(LoRAParam))))
    graphdef, adapters, frozen = nnx.split(model, LoRAParam, ...)

    def loss(adapters, frozen):
        logits = nnx.merge(graphdef, adapters, frozen)(TOKENS)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    grads = jax.jit(jax.grad(loss))(adapters, frozen)
    flat = nnx.to_flat_state(grads)
    assert len(flat) == 2 * 7 and all(isinstance(v, LoRAParam) for _, v in flat)
    for path, value in flat:
        # B = 0 at init: the gradient reaches B, and A's is exactly zero until B moves.
        norm = float(jnp.abs(value[...]).max())
        assert (norm > 0) if path[-1] == "lora_b" else (norm == 0), path
    optimizer = optax.sgd(0.1)
    updates, _ = optimizer.update(grads, optimizer.init(adapters))
    model = nnx.merge(graphdef, optax.apply_updates(adapters, updates), frozen)
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Not(LoRAParam))))
    jax.tree.map(np.testing.assert_array_equal, after, base)
    loss = jax.jit(loss)
    assert loss(nnx.state(model, LoRAParam), frozen) < loss(adapters, frozen)


def test_merge_and_unmerge_are_exact(base, base_logits):
    model = base
    weights = np.asarray(model.blocks.attn.o_proj[...])
    apply_lora(model, LoRAConfig(rank=4, alpha=8), nnx.Rngs(1))
    randomize_b(model)
    adapted = np.asarray(forward(model, TOKENS))
    assert relative(adapted, base_logits) > 0.05
    merge_lora(model)
    assert all(m.merged for m in lora_modules(model).values())
    assert relative(forward(model, TOKENS), adapted) < 1e-5
    merged_o = np.asarray(model.blocks.attn.o_proj.base[...])
    assert np.abs(merged_o - weights).max() > 1e-3
    unmerge_lora(model)
    np.testing.assert_allclose(model.blocks.attn.o_proj.base[...], weights, atol=1e-6)
    assert relative(forward(model, TOKENS), adapted) < 1e-5
    unload_lora(model)  # merged into plain Params again
    assert isinstance(model.blocks.attn.o_proj, nnx.Param)
    assert relative(forward(model, TOKENS), adapted) < 1e-5


def test_dropout_uses_the_key_and_only_in_training(base_model, base_logits):
    model = nnx.clone(base_model)
    apply_lora(model, LoRAConfig(rank=4, dropout=0.5), nnx.Rngs(1))
    randomize_b(model)
    evaluation = np.asarray(forward(model, TOKENS))
    key = jax.random.key(7)
    train_a, train_b = (np.asarray(forward(model, TOKENS, key)) for _ in range(2))
    other = np.asarray(forward(model, TOKENS, jax.random.key(8)))
    np.testing.assert_array_equal(train_a, train_b)
    assert relative(train_a, evaluation) > 1e-3 and relative(train_a, other) > 1e-3
    # Model dropout is 0: the key only reaches the adapters' inputs.
    plain = nnx.clone(base_model)
    np.testing.assert_array_equal(forward(plain, TOKENS, key), base_logits)


def test_qlora_on_a_quantized_base(base):
    model = base
    quantize(model, "int4", group_size=32)
    before = np.asarray(forward(model, TOKENS))
    apply_lora(model, LoRAConfig(rank=4), nnx.Rngs(1))
    assert isinstance(model.blocks.attn.q_proj.base, QuantizedDense)
    np.testing.assert_array_equal(forward(model, TOKENS), before)
    graphdef, adapters, frozen = nnx.split(model, LoRAParam, ...)
    quantized = nnx.state(model, QuantData)
    assert len(jax.tree.leaves(quantized)) == 7 * 3  # values, scales, offsets
    assert not jax.tree.leaves(nnx.state(model, nnx.All(nnx.Param, QuantData)))

    def loss(adapters):
        return jnp.mean(nnx.merge(graphdef, adapters, frozen)(TOKENS) ** 2)

    grads = jax.jit(jax.grad(loss))(adapters)
    assert {type(v) for _, v in nnx.to_flat_state(grads)} == {LoRAParam}
    randomize_b(model)
    with pytest.raises(ValueError, match="quantized base"):
        merge_lora(model)


def test_low_rank_path_runs_on_activations(base):
    """No [D, N * H]-sized update is formed in the forward or backward pass of the adapters."""
    model = base
    apply_lora(model, LoRAConfig(rank=4, targets=("q_proj",)), nnx.Rngs(1))
    graphdef, adapters, frozen = nnx.split(model, LoRAParam, ...)
    jaxpr = jax.make_jaxpr(jax.grad(lambda a: nnx.merge(graphdef, a, frozen)(TOKENS).sum()))(
        adapters
    )

    def shapes(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "dot_general":
                yield tuple(eqn.outvars[0].aval.shape)
            for p in eqn.params.values():
                inner = getattr(p, "jaxpr", None)
                if inner is not None:
                    yield from shapes(getattr(inner, "jaxpr", inner))

    found = set(shapes(jaxpr.jaxpr))
    assert (32, 32) not in found and (32, 4, 8) not in found, found
    assert (32, 4) in found  # A's gradient: x^T @ (g @ B^T)


def test_errors_are_named(base):
    model = base
    with pytest.raises(ValueError, match="match no projection"):
        apply_lora(model, LoRAConfig(targets=("query",)), nnx.Rngs(0))
    apply_lora(model, LoRAConfig(targets=("q_proj",)), nnx.Rngs(0))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRAConfig(), nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="dropout"):
        LoRAConfig(dropout=1.0)
    assert isinstance(model.blocks.attn.q_proj, LoRADense)
