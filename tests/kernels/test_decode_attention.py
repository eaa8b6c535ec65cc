"""Paged decode attention (Pallas, interpret mode) against its reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_test_helpers import normal, relative_error, tolerance

from kernels.decode_attention import (
    decode_attention,
    quantize_kv_int8,
    reference_decode_attention,
)
from kernels.flash_attention import reference_attention

pytestmark = pytest.mark.usefixtures("jax_compile_cache")


def _paged_cache(seed, lengths, page_size, kv_heads, h, dtype, max_pages):
    """Pages shuffled over a pool with spare pages; every slot no sequence owns is NaN."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    needed = [-(-n // page_size) for n in lengths]
    num_pages = sum(needed) + 3
    perm = rng.permutation(num_pages)
    tables = np.full((b, max_pages), 10**6, np.int32)  # never read past a sequence's pages
    poison = np.ones((num_pages, page_size), bool)
    start = 0
    for i, (n, p) in enumerate(zip(lengths, needed, strict=True)):
        tables[i, :p] = perm[start : start + p]
        for j in range(p):
            poison[tables[i, j], : max(0, min(page_size, n - j * page_size))] = False
        start += p
    kk, kv = jax.random.split(jax.random.PRNGKey(seed))
    shape = (num_pages, page_size, kv_heads, h)
    nan = jnp.asarray(poison)[:, :, None, None]
    k = jnp.where(nan, jnp.nan, normal(kk, shape, jnp.float32)).astype(dtype)
    v = jnp.where(nan, jnp.nan, normal(kv, shape, jnp.float32)).astype(dtype)
    return k, v, jnp.asarray(tables), jnp.asarray(lengths, jnp.int32)


CASES = [
    # (lengths, page_size, num_heads, kv_heads, h, dtype)
    pytest.param([5, 16, 37], 16, 8, 2, 64, jnp.float32, id="gqa4-ragged-f32"),
    pytest.param([50, 1, 0], 16, 4, 4, 128, jnp.bfloat16, id="mha-empty-seq-bf16"),
    pytest.param([70, 33], 32, 6, 1, 64, jnp.bfloat16, id="mqa6-bf16"),
]


@pytest.mark.parametrize("lengths,page_size,n,kv,h,dtype", CASES)
def test_kernel_matches_reference(lengths, page_size, n, kv, h, dtype):
    max_pages = -(-max(lengths) // page_size) + 1
    k, v, tables, lens = _paged_cache(sum(lengths), lengths, page_size, kv, h, dtype, max_pages)
    q = normal(jax.random.PRNGKey(n), (len(lengths), n, h), dtype)
    out = jax.jit(decode_attention)(q, k, v, tables, lens)
    assert out.shape == q.shape and out.dtype == dtype
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    expected = reference_decode_attention(*f32, tables, lens)
    assert relative_error(out, expected) <= tolerance(dtype)
    assert np.all(np.asarray(out)[np.asarray(lengths) == 0] == 0)


def test_int8_kv_matches_reference():
    lengths, page_size, n, kv, h = [9, 40], 16, 4, 2, 64
    k, v, tables, lens = _paged_cache(4, lengths, page_size, kv, h, jnp.float32, 4)
    owned = ~jnp.isnan(k[..., 0, 0])  # [num_pages, page_size]
    (k8, k_scales), (v8, v_scales) = quantize_kv_int8(k), quantize_kv_int8(v)
    # Slots no sequence owns get NaN scales: the kernel must never use them.
    k_scales = jnp.where(owned[..., None], k_scales, jnp.nan)
    v_scales = jnp.where(owned[..., None], v_scales, jnp.nan)
    q = normal(jax.random.PRNGKey(9), (len(lengths), n, h), jnp.bfloat16)
    scales = dict(k_scales=k_scales, v_scales=v_scales)
    out = jax.jit(decode_attention)(q, k8, v8, tables, lens, **scales)
    expected = reference_decode_attention(q.astype(jnp.float32), k8, v8, tables, lens, **scales)
    assert relative_error(out, expected) <= tolerance(jnp.bfloat16)
    # And int8 KV stays close to the unquantized cache.
    exact = reference_decode_attention(q.astype(jnp.float32), k, v, tables, lens)
    assert relative_error(expected, exact) <= 2e-2


def test_reference_equals_last_row_of_causal_attention():
    """Decoding token t over a cache of t + 1 keys is the last row of causal self-attention."""
    t, page_size, n, kv, h = 21, 16, 4, 2, 64
    k, v, tables, lens = _paged_cache(1, [t], page_size, kv, h, jnp.float32, 2)
    pages = jnp.take(k, tables[0, :2], axis=0).reshape(1, 2 * page_size, kv, h)[:, :t]
    vals = jnp.take(v, tables[0, :2], axis=0).reshape(1, 2 * page_size, kv, h)[:, :t]
    q = normal(jax.random.PRNGKey(2), (1, t, n, h))
    full = reference_attention(q, pages, vals, causal=True)[:, -1]
    ours = reference_decode_attention(q[:, -1], k, v, tables, lens)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(full), rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise_clear_errors():
    k = jnp.ones((4, 16, 2, 64))
    with pytest.raises(ValueError, match="num_heads=3 is not divisible by num_kv_heads=2"):
        decode_attention(jnp.ones((1, 3, 64)), k, k, jnp.zeros((1, 2), jnp.int32), jnp.ones(1))
    k = jnp.ones((4, 12, 2, 64))
    with pytest.raises(ValueError, match="page_size=12"):
        decode_attention(jnp.ones((1, 2, 64)), k, k, jnp.zeros((1, 2), jnp.int32), jnp.ones(1))
    k = jnp.ones((4, 16, 2, 64), jnp.int8)
    with pytest.raises(ValueError, match="need k_scales and v_scales"):
        decode_attention(jnp.ones((1, 2, 64)), k, k, jnp.zeros((1, 2), jnp.int32), jnp.ones(1))


@pytest.mark.slow
@pytest.mark.parametrize("kv", [1, 8])
def test_sweep(kv):
    lengths = [1, 15, 16, 17, 64, 100]
    k, v, tables, lens = _paged_cache(kv, lengths, 16, kv, 128, jnp.bfloat16, 8)
    q = normal(jax.random.PRNGKey(kv), (len(lengths), 8, 128), jnp.bfloat16)
    out = decode_attention(q, k, v, tables, lens)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    expected = reference_decode_attention(*f32, tables, lens)
    assert relative_error(out, expected) <= tolerance(jnp.bfloat16)
