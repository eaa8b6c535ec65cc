"""The TPU (Mosaic) lowerings: numerics in interpret mode, and ahead-of-time compilation.

Compiling for a TPU v5e from libtpu's topology description (no chip needed) runs Mosaic on the
kernels, which checks what interpret mode cannot: block shapes ((8, 128) tiling of the last two
dims), vector layouts, the supported ops. libtpu is fetched into the project's cache on first
use (`parallel.aot.libtpu_available`); those tests skip, with the reason, only where it cannot
be installed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from kernels import _common
from kernels.decode_attention import (
    decode_attention,
    quantize_kv_int8,
    reference_decode_attention,
)
from kernels.flash_attention import flash_attention, reference_attention
from kernels.quant_matmul import quant_matmul, quantize_int4, quantize_int8, reference_matmul
from parallel import aot

_OK, _REASON = aot.libtpu_available()
needs_libtpu = pytest.mark.skipif(not _OK, reason=f"needs libtpu for TPU AOT: {_REASON}")


@pytest.fixture(scope="module")
def tpu_device():
    if not _OK:
        pytest.skip(f"needs libtpu for TPU AOT: {_REASON}")
    return aot.tpu_topology("v5e:2x2").devices[0]


def _compile_for_tpu(fn, device, *specs):
    """Traces `fn` with the TPU lowerings selected and compiles it for `device` (a TPU v5e)."""
    sharding = SingleDeviceSharding(device)
    args = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for s in specs]
    # Mosaic reads the chip generation from the default device while lowering.
    with _common.use_backend("tpu"), jax.default_device(device):
        lowered = jax.jit(fn).lower(*args)
    text = lowered.as_text()
    return lowered.compile(), text


def _attention_loss(causal, **blocks):
    attn = functools.partial(flash_attention, causal=causal, interpret=False, **blocks)

    def loss(q, k, v, seg):
        out = attn(q, k, v, q_segment_ids=seg, kv_segment_ids=seg)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    return jax.value_and_grad(loss, argnums=(0, 1, 2))


@needs_libtpu
@pytest.mark.parametrize("h,dtype,causal", [(128, jnp.bfloat16, True), (64, jnp.float32, False)])
def test_flash_attention_forward_and_backward_compile_for_tpu(tpu_device, h, dtype, causal):
    # T = 200 is padded to 256: two query and key blocks, so the accumulation over key blocks,
    # the causal skip and GQA (4 query heads on 2 kv heads) are all in the program.
    q, kv = jax.ShapeDtypeStruct((2, 200, 4, h), dtype), jax.ShapeDtypeStruct((2, 200, 2, h), dtype)
    seg = jax.ShapeDtypeStruct((2, 200), jnp.int32)
    compiled, text = _compile_for_tpu(_attention_loss(causal), tpu_device, q, kv, kv, seg)
    for name in ("flash_attention_fwd_tpu", "flash_attention_dq_tpu", "flash_attention_dkv_tpu"):
        assert name in text
    assert "tpu_custom_call" in text  # Mosaic, not interpret mode's HLO loop
    assert compiled.memory_analysis() is not None


@needs_libtpu
@pytest.mark.slow
def test_flash_attention_larger_blocks_compile_for_tpu(tpu_device):
    q = kv = jax.ShapeDtypeStruct((1, 1024, 8, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 1024), jnp.int32)
    blocks = dict(block_q=256, block_k=512, block_q_bwd=128, block_k_bwd=256)
    _compile_for_tpu(_attention_loss(True, **blocks), tpu_device, q, kv, kv, seg)


QUANTIZERS = {
    "int8 per channel": quantize_int8,
    "int8 group 32": functools.partial(quantize_int8, group_size=32),
    "int4 group 32": functools.partial(quantize_int4, group_size=32),
    "int4 group 128": functools.partial(quantize_int4, group_size=128),
}


@needs_libtpu
@pytest.mark.parametrize("fmt", list(QUANTIZERS))
def test_quant_matmul_compiles_for_tpu(tpu_device, fmt):
    w = jax.eval_shape(QUANTIZERS[fmt], jax.ShapeDtypeStruct((1024, 768), jnp.float32))
    leaves, treedef = jax.tree.flatten(w)

    def matmuls(x_decode, x_prefill, *leaves):
        qw = jax.tree.unflatten(treedef, leaves)
        return quant_matmul(x_decode, qw), quant_matmul(x_prefill, qw)

    x_decode = jax.ShapeDtypeStruct((4, 1024), jnp.bfloat16)
    x_prefill = jax.ShapeDtypeStruct((2, 200, 1024), jnp.bfloat16)
    _, text = _compile_for_tpu(matmuls, tpu_device, x_decode, x_prefill, *leaves)
    assert "tpu_custom_call" in text and "_matmul_tpu" in text


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(QUANTIZERS))
def test_tpu_quant_matmul_matches_reference_in_interpret_mode(fmt):
    rng = np.random.default_rng(0)
    w = QUANTIZERS[fmt](jnp.asarray(rng.normal(size=(512, 384)), jnp.float32))
    x = jnp.asarray(rng.normal(size=(3, 5, 512)), jnp.float32)
    with _common.use_backend("tpu"):
        got = quant_matmul(x, w, block_n=128, interpret=True)
    np.testing.assert_allclose(got, reference_matmul(x, w), atol=2e-4, rtol=1e-5)


@needs_libtpu
@pytest.mark.parametrize("h,int8", [(128, False), (64, True)])
def test_decode_attention_compiles_for_tpu(tpu_device, h, int8):
    # Paged GQA decode: 8 query heads on 2 kv heads, 32-slot pages, ragged lengths.
    num_pages, page_size, kv_heads = 16, 32, 2
    pages = jax.ShapeDtypeStruct((num_pages, page_size, kv_heads, h), jnp.bfloat16)
    q = jax.ShapeDtypeStruct((3, 8, h), jnp.bfloat16)
    tables, lengths = jax.ShapeDtypeStruct((3, 5), jnp.int32), jax.ShapeDtypeStruct((3,), jnp.int32)

    def decode(q, k, v, tables, lengths):
        if not int8:
            return decode_attention(q, k, v, tables, lengths)
        (k8, ks), (v8, vs) = quantize_kv_int8(k), quantize_kv_int8(v)
        return decode_attention(q, k8, v8, tables, lengths, k_scales=ks, v_scales=vs)

    _, text = _compile_for_tpu(decode, tpu_device, q, pages, pages, tables, lengths)
    assert "tpu_custom_call" in text and "paged_decode_attention_tpu" in text


@pytest.mark.slow
@pytest.mark.parametrize("int8", [False, True])
def test_tpu_decode_attention_matches_reference_in_interpret_mode(int8):
    # Ragged lengths (0, one page, two pages and a bit), shuffled pages, garbage table entries
    # past each sequence's pages and NaN in every slot no sequence owns.
    lengths, page_size, kv_heads, n, h = [0, 32, 70], 32, 2, 8, 64
    rng = np.random.default_rng(3)
    num_pages = 8
    tables = np.full((3, 4), 10**6, np.int32)
    tables[1, :1], tables[2, :3] = [5], [2, 7, 0]
    owned = np.zeros((num_pages, page_size), bool)
    owned[5, :32], owned[2], owned[7], owned[0, :6] = True, True, True, True
    nan = jnp.asarray(~owned)[:, :, None, None]
    k, v = (
        jnp.where(nan, jnp.nan, jnp.asarray(rng.normal(size=(num_pages, page_size, kv_heads, h))))
        for _ in range(2)
    )
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    q = jnp.asarray(rng.normal(size=(3, n, h)), jnp.float32)
    args = (q, k, v, jnp.asarray(tables), jnp.asarray(lengths, jnp.int32))
    scales = {}
    if int8:
        (k8, ks), (v8, vs) = quantize_kv_int8(k), quantize_kv_int8(v)
        scales = dict(k_scales=ks, v_scales=vs)
        args = (q, k8, v8) + args[3:]
    with _common.use_backend("tpu"):
        got = decode_attention(*args, interpret=True, **scales)
    want = reference_decode_attention(*args, **scales)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.all(np.asarray(got)[0] == 0)


def test_tpu_blocks_must_be_lane_multiples():
    x = jnp.zeros((1, 128, 2, 64), jnp.float32)
    with _common.use_backend("tpu"), pytest.raises(ValueError, match="block_k=64"):
        flash_attention(x, x, x, block_k=64, interpret=True)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_tpu_kernels_match_reference_in_interpret_mode(causal):
    # The TPU kernels' own code path (tiles, scratch accumulators, lane-broadcast rows), run by
    # Pallas' interpreter on CPU: values and gradients equal the reference.
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 200, 4, 64)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(1, 200, 2, 64)), jnp.float32) for _ in range(2))
    seg = np.concatenate([np.ones(120), 2 * np.ones(70), np.zeros(10)])[None].astype(np.int32)
    seg = jnp.asarray(seg)

    def loss(attn, q, k, v):
        out = attn(q, k, v, causal=causal, q_segment_ids=seg, kv_segment_ids=seg)
        return jnp.sum(out**2), out

    grad = jax.grad(loss, argnums=(1, 2, 3), has_aux=True)
    with _common.use_backend("tpu"):
        got, out = grad(functools.partial(flash_attention, interpret=True), q, k, v)
    want, ref = grad(reference_attention, q, k, v)
    np.testing.assert_allclose(out, ref, atol=2e-5)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4)
