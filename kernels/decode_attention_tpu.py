"""The TPU (Mosaic) lowering of kernels/decode_attention.py: paged decode, same cache layout.

Mosaic blocks need their last two dims divisible by (8, 128) or equal to the array's, and a
block of one kv head of a [num_pages, page_size, K, H] cache would put a single head on the
sublane axis. So the cache is viewed (a free reshape) as [num_pages, page_size, K * H] and one
program per (sequence, page) gets a whole page, all kv heads, and loops over the heads; the
pages come by DMA picked from the block table, which is prefetched into scalar memory
(`PrefetchScalarGridSpec`), and the online softmax state (FA2 Alg. 1) of every head lives in
VMEM scratch across the sequential page axis. Pages past a sequence's length are neither
computed nor fetched (their index repeats the last valid page's, so no new DMA is issued).
int8 scales are transposed to [num_pages, K, page_size] in XLA (they are 1/H of the cache) so a
head's scales are a row that multiplies the score columns.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
_NEG = -1e30


def _kernel(lens_ref, bt_ref, q_ref, k_ref, v_ref, *rest, scale, page_size, kv_heads, h):
    *scale_refs, o_ref, m_sc, l_sc, acc_sc = rest
    b, j = pl.program_id(0), pl.program_id(1)
    length = lens_ref[b]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j * page_size < length)
    def _step():
        q_all = q_ref[...]  # [K, rows, H]
        k_all = k_ref[...].astype(q_all.dtype)  # [page_size, K * H]; int8 is exact in bf16
        v_all = v_ref[...].astype(q_all.dtype)
        rows = q_all.shape[1]
        pos = j * page_size + lax.broadcasted_iota(jnp.int32, (rows, page_size), 1)
        valid = pos < length  # [rows, page_size]
        valid_slot = j * page_size + lax.broadcasted_iota(jnp.int32, (page_size, h), 0) < length
        prec = lax.Precision.HIGHEST if q_all.dtype == jnp.float32 else None
        for kh in range(kv_heads):
            q = q_all[kh]
            k = k_all[:, kh * h : (kh + 1) * h]
            v = jnp.where(valid_slot, v_all[:, kh * h : (kh + 1) * h], 0)  # stale slots: NaN?
            s = lax.dot_general(
                q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=prec
            )
            s = s * scale
            if scale_refs:  # dequantize after the dots, as in the GPU kernel
                s = s * scale_refs[0][kh : kh + 1, :]
            s = jnp.where(valid, s, _NEG)
            m_prev, l_prev = m_sc[kh][:, :1], l_sc[kh][:, :1]
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            alpha = jnp.exp(m_prev - m_new)
            p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
            l_sc[kh] = jnp.broadcast_to(
                alpha * l_prev + jnp.sum(p, axis=1, keepdims=True), (rows, LANES)
            )
            m_sc[kh] = jnp.broadcast_to(m_new, (rows, LANES))
            if scale_refs:
                p = p * jnp.where(valid, scale_refs[1][kh : kh + 1, :], 0.0)  # NaN past length
            pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=prec)
            acc_sc[kh] = alpha * acc_sc[kh] + pv

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        denom = l_sc[...][:, :, :1]
        o_ref[...] = (acc_sc[...] / jnp.where(denom > 0, denom, 1.0)).astype(o_ref.dtype)


def decode_attention(qg, k_pages, v_pages, block_tables, lengths, scales, *, scale, interpret):
    """qg [B, K, rows, H] (query heads grouped by kv head, rows padded) -> [B, K, rows, H]."""
    b, kv_heads, rows, h = qg.shape
    num_pages, page_size = k_pages.shape[:2]
    min_page = 32 if k_pages.dtype == jnp.int8 else 16  # int8 / bf16 sublane tiles
    if page_size % min_page:
        raise ValueError(f"page_size={page_size} must be a multiple of {min_page} on TPU")
    k_flat = k_pages.reshape(num_pages, page_size, kv_heads * h)
    v_flat = v_pages.reshape(num_pages, page_size, kv_heads * h)
    scales = tuple(s.transpose(0, 2, 1) for s in scales)  # [num_pages, K, page_size]

    def page_index(bi, j, lens_ref, bt_ref):
        # Past the length, repeat the last valid page (no new DMA); ids there may be garbage.
        last = jnp.maximum(lax.div(lens_ref[bi] + page_size - 1, page_size) - 1, 0)
        page = bt_ref[bi, jnp.minimum(j, last)]
        return (jnp.clip(page, 0, num_pages - 1), 0, 0)

    q_spec = pl.BlockSpec((None, kv_heads, rows, h), lambda bi, j, *_: (bi, 0, 0, 0))
    page_spec = pl.BlockSpec((None, page_size, kv_heads * h), page_index)
    scale_spec = pl.BlockSpec((None, kv_heads, page_size), page_index)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, block_tables.shape[1]),
        in_specs=[q_spec, page_spec, page_spec] + [scale_spec] * len(scales),
        out_specs=q_spec,
        scratch_shapes=[
            pltpu.VMEM((kv_heads, rows, LANES), jnp.float32),
            pltpu.VMEM((kv_heads, rows, LANES), jnp.float32),
            pltpu.VMEM((kv_heads, rows, h), jnp.float32),
        ],
    )
    kernel = functools.partial(_kernel, scale=scale, page_size=page_size, kv_heads=kv_heads, h=h)
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(qg.shape, qg.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="paged_decode_attention_tpu",
    )(lengths, block_tables, qg, k_flat, v_flat, *scales)
