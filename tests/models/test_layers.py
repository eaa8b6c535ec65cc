"""Tests for models/layers.py: RoPE, masks, attention, norms and `project` against references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import layers

# Jitted once per shape: one compile instead of one per eager op.
apply_rope = jax.jit(layers.apply_rope, static_argnums=2)
dot_product_attention = jax.jit(layers.dot_product_attention)
make_attention_mask = jax.jit(layers.make_attention_mask)

pytestmark = pytest.mark.usefixtures("jax_compile_cache")


def _normal(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# ------------------------------------------------------------------------------------------------
# RoPE.


def _rope_score(q, k, q_pos, k_pos, theta=10000.0):
    """q . k after rotating q to q_pos and k to k_pos; q, k: [H]."""
    rq = apply_rope(q[None, None, None], jnp.asarray([[q_pos]]), theta)
    rk = apply_rope(k[None, None, None], jnp.asarray([[k_pos]]), theta)
    return float(jnp.sum(rq * rk))


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_score_depends_only_on_relative_position(theta):
    q, k = _normal((16,), 0), _normal((16,), 1)
    for q_pos, k_pos in [(5, 2), (9, 9), (3, 17)]:
        score = _rope_score(q, k, q_pos, k_pos, theta)
        for shift in (1, 40, 300):
            shifted = _rope_score(q, k, q_pos + shift, k_pos + shift, theta)
            np.testing.assert_allclose(shifted, score, rtol=1e-4, atol=1e-4)
    # ... and does depend on it: otherwise the check above proves nothing.
    assert abs(_rope_score(q, k, 5, 2, theta) - _rope_score(q, k, 5, 4, theta)) > 1e-3


def test_rope_preserves_norm_and_is_identity_at_position_zero():
    x = _normal((2, 7, 3, 8))
    positions = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (2, 7)), jnp.int32)
    rotated = apply_rope(x, positions, 10000.0)
    assert rotated.shape == x.shape and rotated.dtype == x.dtype
    np.testing.assert_allclose(
        jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5
    )
    np.testing.assert_allclose(apply_rope(x, jnp.zeros((2, 7), jnp.int32), 10000.0), x, rtol=1e-6)


def test_rope_matches_hugging_face_rotate_half():
    """Llama's layout: x * cos + rotate_half(x) * sin, with cos/sin repeated over both halves."""
    x = np.asarray(_normal((1, 5, 2, 8)))
    positions = np.arange(5)[None] + 3
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, 8, 2) / 8))
    angles = positions[..., None] * inv_freq  # [1, T, H/2]
    emb = np.concatenate([angles, angles], axis=-1)[:, :, None, :]
    rotate_half = np.concatenate([-x[..., 4:], x[..., :4]], axis=-1)
    expected = x * np.cos(emb) + rotate_half * np.sin(emb)
    got = apply_rope(jnp.asarray(x), jnp.asarray(positions, jnp.int32), 10000.0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_rope_keeps_bf16():
    x = _normal((1, 3, 2, 8)).astype(jnp.bfloat16)
    assert apply_rope(x, jnp.arange(3)[None], 10000.0).dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------------
# Masks and attention.


def test_causal_mask_is_lower_triangular():
    pos = jnp.arange(5)[None]
    mask = make_attention_mask(pos, pos, None, None)
    assert mask.shape == (1, 1, 1, 5, 5)
    np.testing.assert_array_equal(mask[0, 0, 0], np.tril(np.ones((5, 5), bool)))


def test_segment_mask_isolates_sequences_and_padding():
    segments = jnp.asarray([[1, 1, 2, 2, 0]])
    pos = jnp.asarray([[0, 1, 0, 1, 0]])
    mask = np.asarray(make_attention_mask(pos, pos, segments, segments)[0, 0, 0])
    expected = np.array(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0],  # padding attends to nothing
        ],
        bool,
    )
    np.testing.assert_array_equal(mask, expected)


def _reference_attention(q, k, v, mask):
    """Plain numpy MHA after repeating each kv head for its group of query heads."""
    q, k, v = map(np.asarray, (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.asarray(mask)[:, 0], scores, -np.inf)
    scores = scores - scores.max(-1, keepdims=True)
    probs = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", probs, v)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_dot_product_attention_matches_reference(num_kv_heads):
    q = _normal((2, 6, 4, 8), 0)
    k, v = _normal((2, 6, num_kv_heads, 8), 1), _normal((2, 6, num_kv_heads, 8), 2)
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    mask = make_attention_mask(pos, pos, None, None)
    out = dot_product_attention(q, k, v, mask)
    assert out.shape == q.shape
    np.testing.assert_allclose(out, _reference_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_fully_masked_padding_query_stays_finite():
    q, k, v = _normal((1, 3, 2, 4), 0), _normal((1, 3, 2, 4), 1), _normal((1, 3, 2, 4), 2)
    segments, pos = jnp.asarray([[1, 1, 0]]), jnp.asarray([[0, 1, 0]])
    mask = make_attention_mask(pos, pos, segments, segments)
    assert bool(jnp.isfinite(dot_product_attention(q, k, v, mask)).all())


# ------------------------------------------------------------------------------------------------
# Norms, projections, hooks.


def test_rmsnorm_matches_reference_and_keeps_dtype():
    norm = layers.RMSNorm(8, 1e-5, jnp.float32, rngs=nnx.Rngs(0))
    norm.scale.set_value(_normal((8,), 3))
    x = _normal((2, 3, 8))
    xn = np.asarray(x)
    expected = xn / np.sqrt((xn**2).mean(-1, keepdims=True) + 1e-5) * np.asarray(norm.scale[...])
    np.testing.assert_allclose(norm(x), expected, rtol=1e-5, atol=1e-6)
    assert norm(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_layernorm_matches_reference():
    norm = layers.LayerNorm(8, 1e-5, jnp.float32, rngs=nnx.Rngs(0))
    norm.scale.set_value(_normal((8,), 3))
    norm.bias.set_value(_normal((8,), 4))
    x = _normal((2, 3, 8)) * 3 + 1
    xn = np.asarray(x)
    mean, var = xn.mean(-1, keepdims=True), xn.var(-1, keepdims=True)
    expected = (xn - mean) / np.sqrt(var + 1e-5) * np.asarray(norm.scale[...]) + np.asarray(
        norm.bias[...]
    )
    np.testing.assert_allclose(norm(x), expected, rtol=1e-5, atol=1e-5)


def test_project_equals_einsum():
    x, w = _normal((2, 3, 8), 0), _normal((8, 4, 5), 1)
    np.testing.assert_allclose(
        layers.project(x, w), jnp.einsum("BTD,DNH->BTNH", x, w), rtol=1e-5, atol=1e-5
    )
    heads, out = _normal((2, 3, 4, 5), 2), _normal((4, 5, 8), 3)
    np.testing.assert_allclose(
        layers.project(heads, out, num_contract=2),
        jnp.einsum("BTNH,NHD->BTD", heads, out),
        rtol=1e-5,
        atol=1e-5,
    )


def test_constrain_is_identity_without_rules():
    x = _normal((2, 3))
    assert layers.constrain(x, ("batch", "embed")) is x


def test_param_rejects_axes_of_the_wrong_rank():
    with pytest.raises(ValueError, match="rank"):
        layers.param(nnx.Rngs(0), layers.normal(0.02), (2, 3), jnp.float32, ("embed",))


def test_dropout_scales_kept_values():
    x = jnp.ones((1000,))
    y = layers.dropout(x, 0.25, jax.random.key(0))
    kept = np.asarray(y) != 0
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)
    assert 0.65 < kept.mean() < 0.85
    assert layers.dropout(x, 0.25, None) is x
