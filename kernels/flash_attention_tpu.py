"""The TPU (Mosaic) lowering of kernels/flash_attention.py: the same function, TPU-shaped tiles.

Mosaic wants the last two dims of every block divisible by (8, 128) or equal to the array's, and
works on 2-D vectors. So, unlike the GPU kernels (which walk the whole key sequence inside one
program), every grid step here gets one [block_q, H] x [block_k, H] tile through BlockSpecs and
the online softmax state (FA2 Alg. 1) lives in VMEM scratch across the innermost, sequential
("arbitrary") grid axis, as Pallas TPU kernels are written. Layout inside: [B, N, T, H] (heads
before time, so a block's minor dims are (time, head_dim)); segment ids are broadcast to a
[T, 128] lane tile for queries and an [8, S] sublane tile for keys, and the log-sum-exp and
delta rows to [T, 128], so each is a legal block. Scores are [block_q, block_k] in both
backward kernels; the transposed products (P^T dO, dS^T Q) are dot_generals contracting dim 0.

`flash_attention(..., interpret=True)` on CPU runs these kernels in Pallas interpret mode when
`_common.use_backend("tpu")` is active (tests check numerics that way); compiling them for a
TPU topology ahead of time (tests/kernels/test_tpu_lowering.py) proves Mosaic accepts them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES, SUBLANES = 128, 8
_NEG = -1e30  # as in flash_attention: exp(_NEG - m) is 0 without inf - inf


def _params(*semantics: str) -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _dot(a, b, contract=((1,), (1,))):
    """a @ b^T by default (contract the last dims); fp32 operands at full precision."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(
        a, b, (contract, ((), ())), preferred_element_type=jnp.float32, precision=prec
    )


def _mask(qs_ref, ks_ref, i, j, bq, bk, causal):
    """[bq, bk] bool from the lane/sublane-broadcast segment ids and the block positions."""
    q_seg = qs_ref[...][:, :1]  # [bq, 1]
    k_seg = ks_ref[...][:1, :]  # [1, bk]
    mask = (q_seg == k_seg) & (k_seg != 0)
    if causal:
        q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        k_idx = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        mask &= q_idx >= k_idx
    return mask


def _visible(i, j, bq, bk, causal):
    """Whether key block j has any key at or before the last query of query block i."""
    return j * bk <= i * bq + bq - 1 if causal else True


def _fwd_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, cfg):
    bq, bk = cfg.block_q, cfg.block_k
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(_visible(i, j, bq, bk, cfg.causal))
    def _step():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        mask = _mask(qs_ref, ks_ref, i, j, bq, bk, cfg.causal)
        s = jnp.where(mask, _dot(q, k) * cfg.scale, _NEG)  # [bq, bk]
        m_prev, l_prev = m_sc[...][:, :1], l_sc[...][:, :1]  # [bq, 1]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(v.dtype), v, ((1,), (0,)))
        m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
        l_sc[...] = jnp.broadcast_to(l_new, l_sc.shape)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        denom = l_sc[...][:, :1]
        safe = jnp.where(denom > 0, denom, 1.0)
        o_ref[...] = (acc_sc[...] / safe).astype(o_ref.dtype)
        lse = jnp.where(denom > 0, m_sc[...][:, :1] + jnp.log(safe), 0.0)
        lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def _seg_tiles(q_seg, k_seg):
    """[B, T] -> [B, T, 128] (queries) and [B, S] -> [B, 8, S] (keys), int32."""
    b, t = q_seg.shape
    s = k_seg.shape[1]
    return (
        jnp.broadcast_to(q_seg[:, :, None], (b, t, LANES)),
        jnp.broadcast_to(k_seg[:, None, :], (b, SUBLANES, s)),
    )


def forward(q, k, v, q_seg, k_seg, cfg):
    """Padded [B, T, N, H] inputs -> (out [B, T, N, H], lse [B, N, T, 128] float32)."""
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    bq, bk = cfg.block_q, cfg.block_k
    qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, heads, time, H]
    qs, ks = _seg_tiles(q_seg, k_seg)
    q_spec = pl.BlockSpec((None, None, bq, h), lambda bi, ni, i, j: (bi, ni, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, h), lambda bi, ni, i, j: (bi, ni // g, j, 0))
    row_spec = pl.BlockSpec((None, None, bq, LANES), lambda bi, ni, i, j: (bi, ni, i, 0))
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(b, n, t // bq, s // bk),
        in_specs=[
            q_spec,
            kv_spec,
            kv_spec,
            pl.BlockSpec((None, bq, LANES), lambda bi, ni, i, j: (bi, i, 0)),
            pl.BlockSpec((None, SUBLANES, bk), lambda bi, ni, i, j: (bi, 0, j)),
        ],
        out_specs=[q_spec, row_spec],
        out_shape=[
            jax.ShapeDtypeStruct(qt.shape, q.dtype),
            jax.ShapeDtypeStruct((b, n, t, LANES), jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, LANES), jnp.float32),
            pltpu.VMEM((bq, LANES), jnp.float32),
            pltpu.VMEM((bq, h), jnp.float32),
        ],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=cfg.interpret,
        name="flash_attention_fwd_tpu",
    )(qt, kt, vt, qs, ks)
    return out.transpose(0, 2, 1, 3), lse


def _dq_kernel(
    q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc, *, cfg
):
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(_visible(i, j, bq, bk, cfg.causal))
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        mask = _mask(qs_ref, ks_ref, i, j, bq, bk, cfg.causal)
        p = jnp.where(mask, jnp.exp(_dot(q, k) * cfg.scale - lse_ref[...][:, :1]), 0.0)
        ds = p * (_dot(do, v) - delta_ref[...][:, :1])  # dL/dscores (FA2 Alg. 2)
        dq_sc[...] += _dot(ds.astype(k.dtype), k, ((1,), (0,)))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
    dk_sc, dv_sc, *, cfg,
):  # fmt: skip
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    j, gi, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    first = (gi == 0) & (i == 0)
    last = (gi == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1)

    @pl.when(first)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(_visible(i, j, bq, bk, cfg.causal))
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        mask = _mask(qs_ref, ks_ref, i, j, bq, bk, cfg.causal)
        p = jnp.where(mask, jnp.exp(_dot(q, k) * cfg.scale - lse_ref[...][:, :1]), 0.0)
        dv_sc[...] += _dot(p.astype(do.dtype), do, ((0,), (0,)))  # P^T dO: [bk, H]
        ds = p * (_dot(do, v) - delta_ref[...][:, :1])
        dk_sc[...] += _dot(ds.astype(q.dtype), q, ((0,), (0,)))  # dS^T Q

    @pl.when(last)
    def _finish():
        dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward(q, k, v, q_seg, k_seg, out, lse, do, cfg):
    """Padded inputs, forward residuals and dO -> (dq, dk, dv) in the [B, T/S, heads, H] layout."""
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    # delta_t = rowsum(dO * O) (FA2 Alg. 2 line 4) in XLA, lane-broadcast like lse.
    delta = jnp.einsum("BTNH,BTNH->BNT", do.astype(jnp.float32), out.astype(jnp.float32))
    delta = jnp.broadcast_to(delta[..., None], (b, n, t, LANES))
    qt, kt, vt, dot_ = (x.transpose(0, 2, 1, 3) for x in (q, k, v, do))
    qs, ks = _seg_tiles(q_seg, k_seg)

    q_blk = pl.BlockSpec((None, None, bq, h), lambda bi, ni, i, j: (bi, ni, i, 0))
    kv_blk = pl.BlockSpec((None, None, bk, h), lambda bi, ni, i, j: (bi, ni // g, j, 0))
    row_blk = pl.BlockSpec((None, None, bq, LANES), lambda bi, ni, i, j: (bi, ni, i, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(b, n, t // bq, s // bk),
        in_specs=[
            q_blk,
            kv_blk,
            kv_blk,
            pl.BlockSpec((None, bq, LANES), lambda bi, ni, i, j: (bi, i, 0)),
            pl.BlockSpec((None, SUBLANES, bk), lambda bi, ni, i, j: (bi, 0, j)),
            q_blk,
            row_blk,
            row_blk,
        ],
        out_specs=q_blk,
        out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=cfg.interpret,
        name="flash_attention_dq_tpu",
    )(qt, kt, vt, qs, ks, dot_, lse, delta)

    # One program per (batch, kv head, key block); the G query heads of its group and the query
    # blocks are the two sequential axes it accumulates over.
    q_grp = pl.BlockSpec((None, None, bq, h), lambda bi, ki, j, gi, i: (bi, ki * g + gi, i, 0))
    kv_own = pl.BlockSpec((None, None, bk, h), lambda bi, ki, j, gi, i: (bi, ki, j, 0))
    row_grp = pl.BlockSpec(
        (None, None, bq, LANES), lambda bi, ki, j, gi, i: (bi, ki * g + gi, i, 0)
    )
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(b, kv_heads, s // bk, g, t // bq),
        in_specs=[
            q_grp,
            kv_own,
            kv_own,
            pl.BlockSpec((None, bq, LANES), lambda bi, ki, j, gi, i: (bi, i, 0)),
            pl.BlockSpec((None, SUBLANES, bk), lambda bi, ki, j, gi, i: (bi, 0, j)),
            q_grp,
            row_grp,
            row_grp,
        ],
        out_specs=[kv_own, kv_own],
        out_shape=[jax.ShapeDtypeStruct(kt.shape, k.dtype)] * 2,
        scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32)] * 2,
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
        interpret=cfg.interpret,
        name="flash_attention_dkv_tpu",
    )(qt, kt, vt, qs, ks, dot_, lse, delta)
    return tuple(x.transpose(0, 2, 1, 3) for x in (dq, dk, dv))
