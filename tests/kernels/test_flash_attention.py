"""Flash attention (Pallas, interpret mode) against its plain-JAX reference: values and grads."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_test_helpers import normal, relative_error, tolerance

from kernels.flash_attention import flash_attention, reference_attention
from models.layers import dot_product_attention, make_attention_mask

# Small blocks so that short sequences still span several blocks (and a ragged last one).
pytestmark = pytest.mark.usefixtures("jax_compile_cache")  # halves XLA:CPU compile time

BLOCKS = dict(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)


def _inputs(seed, b, t, s, n, kv, h, dtype):
    kq, kk, kv_, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = normal(kq, (b, t, n, h), dtype)
    k = normal(kk, (b, s, kv, h), dtype)
    v = normal(kv_, (b, s, kv, h), dtype)
    return q, k, v, normal(kd, (b, t, n, h), jnp.float32)


def _packed_segments(b, t, seed):
    """Each row: 1-3 packed sequences of random length, then random-length padding (id 0)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t), size=3, replace=False))
        row = np.zeros(t, np.int32)
        row[: cuts[0]] = 1
        row[cuts[0] : cuts[1]] = 2
        row[cuts[1] : cuts[2]] = 3  # then padding until t
        rows.append(row)
    return jnp.asarray(np.stack(rows))


CASES = [
    # (b, t, s, n, kv, h, dtype, causal, segments)
    pytest.param(2, 40, 40, 4, 2, 64, jnp.float32, True, True, id="gqa2-causal-packed-f32"),
    pytest.param(1, 24, 40, 4, 1, 64, jnp.bfloat16, False, False, id="mqa-cross-bf16"),
    pytest.param(1, 33, 33, 2, 2, 128, jnp.float32, False, True, id="mha-h128-packed-f32"),
    pytest.param(2, 20, 20, 6, 2, 128, jnp.bfloat16, True, False, id="gqa3-causal-h128-bf16"),
]


def _out_and_grads(fn, q, k, v, do):
    """Output and (dq, dk, dv) for the cotangent do, as one compiled program."""
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(do.astype(out.dtype))


def _check_against_reference(kernel, ref, q, k, v, do):
    dtype = q.dtype
    out, grads = jax.jit(functools.partial(_out_and_grads, kernel))(q, k, v, do)
    # The reference runs in float32 on the same (rounded) inputs.
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref_out, ref_grads = _out_and_grads(ref, *f32, do)
    assert out.dtype == dtype and out.shape == q.shape
    assert relative_error(out, ref_out) <= tolerance(dtype)
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        assert g.dtype == dtype, name
        assert relative_error(g, rg) <= tolerance(dtype), f"d{name}"


@pytest.mark.parametrize("b,t,s,n,kv,h,dtype,causal,segments", CASES)
def test_forward_and_gradients_match_reference(b, t, s, n, kv, h, dtype, causal, segments):
    q, k, v, do = _inputs(b * 100 + t, b, t, s, n, kv, h, dtype)
    seg = {}
    if segments:
        q_seg = _packed_segments(b, t, t)
        seg = dict(
            q_segment_ids=q_seg, kv_segment_ids=q_seg if s == t else _packed_segments(b, s, s)
        )
    kernel = functools.partial(flash_attention, causal=causal, **seg, **BLOCKS)
    ref = functools.partial(reference_attention, causal=causal, **seg)
    _check_against_reference(kernel, ref, q, k, v, do)


def test_reference_equals_model_attention_on_valid_rows():
    """Same function as models.layers.dot_product_attention, which differs on padding rows only."""
    b, t, n, kv, h = 2, 24, 4, 2, 64
    q, k, v, _ = _inputs(7, b, t, t, n, kv, h, jnp.float32)
    seg = _packed_segments(b, t, 3)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = make_attention_mask(positions, positions, seg, seg, causal=True)
    model = dot_product_attention(q, k, v, mask)
    ours = reference_attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg)
    valid = np.asarray(seg != 0)
    np.testing.assert_allclose(
        np.asarray(ours)[valid], np.asarray(model)[valid], rtol=1e-5, atol=1e-6
    )
    assert np.all(np.asarray(ours)[~valid] == 0)


def test_padding_queries_output_zero_and_get_zero_gradient():
    b, t, n, kv, h = 1, 20, 2, 1, 64
    q, k, v, do = _inputs(11, b, t, t, n, kv, h, jnp.float32)
    seg = jnp.asarray([[1] * 12 + [0] * 8])
    fn = functools.partial(flash_attention, q_segment_ids=seg, kv_segment_ids=seg, **BLOCKS)
    out, vjp = jax.vjp(fn, q, k, v)
    dq, dk, dv = vjp(do.astype(out.dtype))
    assert np.all(np.asarray(out[:, 12:]) == 0) and np.all(np.asarray(dq[:, 12:]) == 0)
    # Padding keys are never attended to, so they get no gradient either.
    assert np.all(np.asarray(dk[:, 12:]) == 0) and np.all(np.asarray(dv[:, 12:]) == 0)


def test_unsupported_head_dim_falls_back_to_reference():
    q, k, v, _ = _inputs(5, 1, 10, 10, 2, 2, 32, jnp.float32)
    np.testing.assert_array_equal(flash_attention(q, k, v), reference_attention(q, k, v))


def test_bad_arguments_raise_clear_errors():
    q, k, v, _ = _inputs(5, 1, 16, 16, 3, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match="num_heads=3 is not divisible by num_kv_heads=2"):
        flash_attention(q, k, v)
    q, k, v, _ = _inputs(5, 1, 16, 16, 2, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match="power of two"):
        flash_attention(q, k, v, block_q=24)
    with pytest.raises(ValueError, match="both"):
        flash_attention(q, k, v, q_segment_ids=jnp.ones((1, 16), jnp.int32))


def test_interpret_outputs_start_as_nan():
    """The poison check's premise: an output element a kernel never writes reads back as NaN."""
    from jax.experimental import pallas as pl

    def writes_first_half(x_ref, o_ref):
        o_ref[:4] = x_ref[:4]

    out = pl.pallas_call(
        writes_first_half, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32), interpret=True
    )(jnp.ones(8, jnp.float32))
    assert np.all(np.isnan(np.asarray(out[4:])))


@pytest.mark.slow
@pytest.mark.parametrize(
    "t,kv,causal,dtype",
    [(17, 1, True, jnp.bfloat16), (100, 4, True, jnp.float32), (100, 1, False, jnp.bfloat16)],
)
def test_sweep(t, kv, causal, dtype):
    """Uneven blocks (block_q != block_k, forward != backward), packed ragged rows, sm_scale."""
    b, n, h = 2, 4, 64
    q, k, v, do = _inputs(t + kv, b, t, t, n, kv, h, dtype)
    seg = _packed_segments(b, t, t)
    kw = dict(causal=causal, q_segment_ids=seg, kv_segment_ids=seg, sm_scale=0.3)
    blocks = dict(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32)
    kernel = functools.partial(flash_attention, **kw, **blocks)
    _check_against_reference(kernel, functools.partial(reference_attention, **kw), q, k, v, do)
