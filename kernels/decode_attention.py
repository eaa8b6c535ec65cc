"""Decode attention: one query token per sequence over a paged KV cache, as a Pallas kernel.

Layout: q [B, N, H]; k_pages, v_pages [num_pages, page_size, K, H] (N = K * G, GQA/MQA);
block_tables [B, max_pages] int32 (logical page j of sequence b lives in physical page
block_tables[b, j]); lengths [B] int32, ragged (0 allowed: the output is 0). Entries of
block_tables past a sequence's last page are never read, nor are cache slots past its length
(they may hold anything, NaN included). Optional int8 KV: int8 pages with float32 scales per
(page, slot, kv head), dequantized inside the kernel after the dots.

Algorithm: one program per (sequence, kv head) handles the G query heads of its group (padded to
at least 16 rows so the dots are Triton-sized) and walks the sequence's pages with the online
softmax (FA2 Alg. 1), one page per step. Backends: GPU via Pallas' Triton lowering; TPU through
Mosaic (kernels/decode_attention_tpu.py: one program per (sequence, page) over all kv heads,
pages fetched by DMA from the prefetched block table); CPU in interpret mode (default there).
Not yet: split-K over pages for long sequences with a small batch (flash decoding), several
pages per step.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import _common, decode_attention_tpu

_NEG = -1e30  # finite "minus infinity", as in flash_attention


def _kernel(lens_ref, bt_ref, q_ref, k_ref, v_ref, *rest, scale: float, page_size: int):
    *scale_refs, o_ref = rest  # int8 KV: per-slot scales of k and v, [num_pages, page_size]
    b = pl.program_id(0)
    length = lens_ref[b]
    q = q_ref[...]  # [Gp, H]
    prec = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def body(j, carry):
        acc, m, denom = carry
        page = bt_ref[b, j]
        valid = j * page_size + jnp.arange(page_size) < length  # [page_size]
        k = k_ref[page, :, :].astype(q.dtype)  # [page_size, H]; int8 values are exact in bf16
        v = jnp.where(valid[:, None], v_ref[page, :, :], 0).astype(q.dtype)  # stale slots: NaN?
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32, precision=prec) * scale
        if scale_refs:  # dequantize after the dots: (q . k_int) * k_scale, (p * v_scale) . v_int
            s = s * scale_refs[0][page, :][None, :]
        s = jnp.where(valid[None, :], s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(valid[None, :], jnp.exp(s - m_new[:, None]), 0.0)
        denom = alpha * denom + jnp.sum(p, axis=1)
        if scale_refs:
            p = p * jnp.where(valid, scale_refs[1][page, :], 0.0)[None, :]
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=prec)
        return alpha[:, None] * acc + pv, m_new, denom

    rows, h = q.shape
    init = (
        jnp.zeros((rows, h), jnp.float32),
        jnp.full((rows,), _NEG, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    num_pages = lax.div(length + page_size - 1, page_size)
    acc, _, denom = lax.fori_loop(0, num_pages, body, init)
    o_ref[...] = (acc / jnp.where(denom > 0, denom, 1.0)[:, None]).astype(o_ref.dtype)


def _check(q, k_pages, v_pages, block_tables, lengths, k_scales=None, v_scales=None):
    if q.ndim != 3 or k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            f"expected q [B, N, H] and k_pages = v_pages [num_pages, page_size, K, H]; got "
            f"{q.shape}, {k_pages.shape}, {v_pages.shape}"
        )
    b, n, h = q.shape
    _, page_size, kv_heads, kh = k_pages.shape
    if kh != h:
        raise ValueError(f"q head_dim={h} differs from the cache's head_dim={kh}")
    if n % kv_heads:
        raise ValueError(f"num_heads={n} is not divisible by num_kv_heads={kv_heads}")
    if block_tables.ndim != 2 or block_tables.shape[0] != b or lengths.shape != (b,):
        raise ValueError(
            f"expected block_tables [B={b}, max_pages] and lengths [B={b}]; got "
            f"{block_tables.shape}, {lengths.shape}"
        )
    if page_size < 16 or page_size & (page_size - 1):
        raise ValueError(f"page_size={page_size} must be a power of two >= 16 (Triton tiles)")
    quantized = k_pages.dtype == jnp.int8
    if quantized != (k_scales is not None) or (k_scales is None) != (v_scales is None):
        raise ValueError(
            "int8 k_pages/v_pages need k_scales and v_scales (and other dtypes take none); got "
            f"{k_pages.dtype} pages with scales {'given' if k_scales is not None else 'missing'}"
        )
    if k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages {k_pages.dtype} and v_pages {v_pages.dtype} differ in dtype")
    if quantized and (k_scales.shape != k_pages.shape[:3] or v_scales.shape != k_pages.shape[:3]):
        raise ValueError(
            f"k_scales {k_scales.shape} and v_scales {v_scales.shape} must be [num_pages, "
            f"page_size, K] = {k_pages.shape[:3]}"
        )


def quantize_kv_int8(pages: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 per cache slot and kv head.

    [num_pages, page_size, K, H] -> (int8 pages of that shape, float32 scales [num_pages,
    page_size, K]).
    """
    scale = jnp.max(jnp.abs(pages.astype(jnp.float32)), axis=-1) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(pages.astype(jnp.float32) / scale[..., None]), -127, 127)
    return q.astype(jnp.int8), scale


def decode_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    lengths: jax.Array,
    *,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
    sm_scale: float | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Attention of one new token per sequence over its paged cache.

    Args:
      q: [B, N, H] queries. k_pages, v_pages: [num_pages, page_size, K, H].
      block_tables: [B, max_pages] int32 physical page ids. lengths: [B] int32 tokens per
        sequence (each <= max_pages * page_size).
      k_scales, v_scales: [num_pages, page_size, K] float32, only with int8 pages (see
        `quantize_kv_int8`): the cache holds k_pages * k_scales[..., None].
      sm_scale: score scale, default 1/sqrt(H).
      interpret: Pallas interpret mode; default True on CPU.

    Returns:
      [B, N, H] in q's dtype.
    """
    _check(q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales)
    b, n, h = q.shape
    num_pages, page_size, kv_heads, _ = k_pages.shape
    g = n // kv_heads
    rows = max(16, _common.next_power_of_2(g))
    scale = 1.0 / math.sqrt(h) if sm_scale is None else float(sm_scale)
    qg = jnp.pad(q.reshape(b, kv_heads, g, h), ((0, 0), (0, 0), (0, rows - g), (0, 0)))
    q_spec = pl.BlockSpec((None, None, rows, h), lambda bi, ki: (bi, ki, 0, 0))
    # The whole cache of one kv head is visible; pages are picked inside through the table.
    kv_spec = pl.BlockSpec((num_pages, page_size, None, h), lambda bi, ki: (0, 0, ki, 0))
    scale_spec = pl.BlockSpec((num_pages, page_size, None), lambda bi, ki: (0, 0, ki))
    scales = () if k_scales is None else (k_scales, v_scales)
    interpret = _common.resolve_interpret(interpret)
    if _common.backend() == "tpu":
        out = decode_attention_tpu.decode_attention(
            qg, k_pages, v_pages, block_tables.astype(jnp.int32), lengths.astype(jnp.int32),
            scales, scale=scale, interpret=interpret,
        )  # fmt: skip
        return out[:, :, :g].reshape(b, n, h)
    out = _common.pallas_call(
        functools.partial(_kernel, scale=scale, page_size=page_size),
        interpret=interpret,
        grid=(b, kv_heads),
        in_specs=[
            pl.BlockSpec((b,), lambda bi, ki: (0,)),
            pl.BlockSpec(block_tables.shape, lambda bi, ki: (0, 0)),
            q_spec,
            kv_spec,
            kv_spec,
        ]
        + [scale_spec] * len(scales),
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        name="paged_decode_attention",
    )(lengths.astype(jnp.int32), block_tables.astype(jnp.int32), qg, k_pages, v_pages, *scales)
    return out[:, :, :g].reshape(b, n, h)


def reference_decode_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    lengths: jax.Array,
    *,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
    sm_scale: float | None = None,
) -> jax.Array:
    """Plain-JAX decode attention, the same function (gathers the pages, then masks)."""
    _check(q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales)
    if k_scales is not None:
        k_pages = k_pages.astype(jnp.float32) * k_scales[..., None]
        v_pages = v_pages.astype(jnp.float32) * v_scales[..., None]
    b, n, h = q.shape
    num_pages, page_size, kv_heads, _ = k_pages.shape
    scale = 1.0 / math.sqrt(h) if sm_scale is None else float(sm_scale)
    pages = jnp.clip(block_tables, 0, num_pages - 1)
    s_len = block_tables.shape[1] * page_size
    k = jnp.take(k_pages, pages, axis=0).reshape(b, s_len, kv_heads, h).astype(jnp.float32)
    v = jnp.take(v_pages, pages, axis=0).reshape(b, s_len, kv_heads, h).astype(jnp.float32)
    valid = jnp.arange(s_len)[None, :] < lengths[:, None]  # [B, S]
    v = jnp.where(valid[:, :, None, None], v, 0.0)
    qg = q.reshape(b, kv_heads, n // kv_heads, h).astype(jnp.float32)
    hi = lax.Precision.HIGHEST
    scores = jnp.einsum("BKGH,BSKH->BKGS", qg, k, precision=hi) * scale
    scores = jnp.where(valid[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1) * (lengths > 0)[:, None, None, None]
    out = jnp.einsum("BKGS,BSKH->BKGH", probs, v, precision=hi)
    return out.reshape(b, n, h).astype(q.dtype)
