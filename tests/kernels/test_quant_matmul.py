"""Weight-only int8/int4 matmul (Pallas, interpret mode) against its reference; GGUF blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_test_helpers import normal, relative_error, tolerance

from kernels.quant_matmul import (
    dequantize,
    from_gguf,
    quant_matmul,
    quantize_int4,
    quantize_int8,
    reference_matmul,
)
from models import gguf

pytestmark = pytest.mark.usefixtures("jax_compile_cache")


def _weight(seed, k, n):
    return normal(jax.random.PRNGKey(seed), (k, n)) * 0.1


CASES = [
    # (m_shape, k, n, format, dtype)
    pytest.param((1,), 256, 96, "int8", jnp.bfloat16, id="gemv-int8-channel-bf16"),
    pytest.param((3, 5), 128, 64, "int8", jnp.float32, id="int8-channel-f32"),
    pytest.param((7,), 128, 48, "int8-g32", jnp.float32, id="int8-group32-f32"),
    pytest.param((1,), 256, 64, "int4-g32", jnp.float32, id="gemv-int4-g32-f32"),
    pytest.param((33,), 128, 80, "int4-g64", jnp.bfloat16, id="int4-g64-bf16"),
    pytest.param((2, 100), 256, 32, "int4-g128", jnp.bfloat16, id="prefill-int4-g128-bf16"),
]


def _quantize(w, fmt):
    if fmt == "int8":
        return quantize_int8(w)
    bits, group = fmt.split("-g")
    return (quantize_int8 if bits == "int8" else quantize_int4)(w, int(group))


@pytest.mark.parametrize("m_shape,k,n,fmt,dtype", CASES)
def test_kernel_matches_reference(m_shape, k, n, fmt, dtype):
    w = _quantize(_weight(k + n, k, n), fmt)
    x = normal(jax.random.PRNGKey(len(m_shape) + k), m_shape + (k,), dtype)
    y = quant_matmul(x, w, block_m=16, block_n=32)
    assert y.shape == m_shape + (n,) and y.dtype == dtype
    # The reference sees the same (rounded) activations, in float32.
    assert relative_error(y, reference_matmul(x.astype(jnp.float32), w)) <= tolerance(dtype)


@pytest.mark.parametrize("fmt,bound", [("int8", 0.01), ("int4-g32", 0.08), ("int4-g128", 0.1)])
def test_quantizers_round_trip(fmt, bound):
    w = _weight(3, 256, 64)
    q = _quantize(w, fmt)
    err = jnp.max(jnp.abs(dequantize(q) - w)) / jnp.max(jnp.abs(w))
    assert float(err) <= bound
    # Quantizing the dequantized weight again changes nothing (the grid is exact).
    again = dequantize(_quantize(dequantize(q), fmt))
    np.testing.assert_allclose(np.asarray(again), np.asarray(dequantize(q)), atol=1e-5)


def _gguf_blocks(ggml_type, out_dim, in_dim, seed):
    """Random but valid GGUF block bytes: finite f16 scales/mins, random quants."""
    rng = np.random.default_rng(seed)
    n = out_dim * in_dim // 32
    scales = rng.uniform(0.001, 0.02, (n, 2)).astype(np.float16).view(np.uint8)
    if ggml_type == "Q8_0":
        quants = rng.integers(-127, 128, (n, 32)).astype(np.int8).view(np.uint8)
        return np.concatenate([scales[:, :2], quants], axis=1)
    quants = rng.integers(0, 256, (n, 16)).astype(np.uint8)
    head = scales[:, :2] if ggml_type == "Q4_0" else scales[:, :4]
    return np.concatenate([head, quants], axis=1)


@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_load_exactly(ggml_type):
    out_dim, in_dim = 48, 128
    raw = _gguf_blocks(ggml_type, out_dim, in_dim, seed=len(ggml_type)).reshape(-1)
    tensor = gguf.GGUFTensor("blk.0.ffn_up.weight", ggml_type, (out_dim, in_dim), raw)
    w = from_gguf(tensor)
    assert w.shape == (in_dim, out_dim)
    expected = tensor.dequantize().T  # [in, out]
    np.testing.assert_allclose(np.asarray(dequantize(w)), expected, rtol=1e-6, atol=1e-7)
    x = normal(jax.random.PRNGKey(0), (4, in_dim))
    y = quant_matmul(x, w, block_m=16, block_n=16)
    assert relative_error(y, x @ jnp.asarray(expected)) <= 1e-5


def test_bad_arguments_raise_clear_errors():
    w = _weight(1, 128, 32)
    with pytest.raises(ValueError, match="group_size=48"):
        quantize_int4(w, 48)
    with pytest.raises(ValueError, match="does not match"):
        quant_matmul(jnp.ones((2, 64)), quantize_int8(w))
    tensor = gguf.GGUFTensor("t", "Q6_K", (32, 256), np.zeros(210 * 32, np.uint8))
    with pytest.raises(ValueError, match="Q8_0/Q4_0/Q4_1"):
        from_gguf(tensor)


@pytest.mark.slow
@pytest.mark.parametrize("m", [1, 64])
@pytest.mark.parametrize("fmt", ["int8", "int4-g128"])
def test_sweep(m, fmt):
    w = _quantize(_weight(m, 256, 128), fmt)
    x = normal(jax.random.PRNGKey(m), (m, 256), jnp.bfloat16)
    y = quant_matmul(x, w)
    assert relative_error(y, reference_matmul(x.astype(jnp.float32), w)) <= tolerance(jnp.bfloat16)
