"""Flash attention (FlashAttention-2, Dao 2023) forward and backward as Pallas kernels.

Layout [B, T, N, H] queries and [B, S, K, H] keys/values (N = K * G: MHA, GQA, MQA), as in
models/layers.py. Forward: one program per (batch, head, query block) runs the online softmax
(FA2 Alg. 1) over key blocks, keeping only a [block_q, block_k] tile of scores; it saves the
log-sum-exp per query. Backward (FA2 Alg. 2): a dq kernel over (batch, head, query block) and a
dk/dv kernel over (batch, kv head, key block) that loops over the G query heads of its group and
the query blocks, recomputing the probabilities from the saved log-sum-exp. Both are tied
together with `jax.custom_vjp`.

Masks: causal (query t sees key s <= t, both counted from 0) and segment ids (packed sequences;
0 = padding, as in `models.layers.make_attention_mask`). Sequence lengths are padded internally
to the block size and the padding gets segment id 0. A fully masked query row (a padding query)
returns 0 here and in `reference_attention` (models/layers.dot_product_attention returns a
uniform average there; those rows are never used).

Backends: GPU through Pallas' Triton lowering (Triton `CompilerParams`, power-of-two blocks);
TPU through Mosaic (kernels/flash_attention_tpu.py: the same algorithm in TPU-legal tiles, blocks
multiples of 128); CPU in interpret mode (the default there, for tests). head_dim other than
64/128 falls back to `reference_attention`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import _common, flash_attention_tpu

SUPPORTED_HEAD_DIMS = (64, 128)

# A finite "minus infinity": exp(_NEG - m) underflows to 0 without the inf - inf = NaN of a
# fully masked row; masked probabilities are also zeroed explicitly with jnp.where.
_NEG = -1e30

# Default blocks per backend (block_q, block_k, block_q_bwd, block_k_bwd). GPU values follow the
# Triton FA2 kernels' usual tiles (not yet tuned on our hardware); on CPU (interpret mode) fewer,
# bigger blocks are faster because interpret mode pays per grid step. TPU: one MXU-sized tile
# (128; v5e's MXU is 128x128), the smallest legal key block (segment ids put it in the lanes);
# not tuned on hardware.
BLOCK_SIZES: dict[str, tuple[int, int, int, int]] = {
    "gpu": (128, 64, 64, 64),
    "cpu": (128, 128, 128, 128),
    "tpu": (128, 128, 128, 128),
}


@dataclasses.dataclass(frozen=True)
class _Config:
    causal: bool
    scale: float
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    interpret: bool
    backend: str = "gpu"


def _dot(a, b, precision):
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)


def _precision(dtype):
    # fp32 inputs must not silently run in TF32 on GPU; bf16 runs at native precision.
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _mask(q_seg, k_seg, q_idx, k_idx, causal: bool):
    """[bq, bk] bool: same non-zero segment, and key not after query when causal."""
    mask = (q_seg[:, None] == k_seg[None, :]) & (k_seg[None, :] != 0)
    if causal:
        mask &= q_idx[:, None] >= k_idx[None, :]
    return mask


# ------------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, *, cfg: _Config, s_len: int):
    bq, bk = cfg.block_q, cfg.block_k
    i = pl.program_id(2)
    q = q_ref[...]  # [bq, H]
    q_seg = qs_ref[...]
    q_idx = i * bq + jnp.arange(bq)
    prec = _precision(q.dtype)

    def body(j, carry):
        acc, m, denom = carry
        ks = pl.ds(j * bk, bk)
        k, v = k_ref[ks, :], v_ref[ks, :]
        s = _dot(q, k.T, prec) * cfg.scale  # [bq, bk]
        mask = _mask(q_seg, ks_ref[ks], q_idx, j * bk + jnp.arange(bk), cfg.causal)
        s = jnp.where(mask, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        denom = alpha * denom + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, prec)
        return acc, m_new, denom

    num_k = s_len // bk
    if cfg.causal:  # key blocks wholly after this query block are skipped
        num_k = jnp.minimum(num_k, lax.div((i + 1) * bq + bk - 1, bk))
    init = (
        jnp.zeros((bq, q.shape[-1]), jnp.float32),
        jnp.full((bq,), _NEG, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m, denom = lax.fori_loop(0, num_k, body, init)
    safe_denom = jnp.where(denom > 0, denom, 1.0)
    o_ref[...] = (acc / safe_denom[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(denom > 0, m + jnp.log(safe_denom), 0.0)


def _forward(q, k, v, q_seg, k_seg, cfg: _Config):
    """Padded inputs -> (out [B, T, N, H], lse [B, N, T] float32; [B, N, T, 128] on TPU)."""
    if cfg.backend == "tpu":
        return flash_attention_tpu.forward(q, k, v, q_seg, k_seg, cfg)
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    bq = cfg.block_q
    kernel = functools.partial(_fwd_kernel, cfg=cfg, s_len=s)
    q_spec = pl.BlockSpec((None, bq, None, h), lambda bi, ni, i: (bi, i, ni, 0))
    kv_spec = pl.BlockSpec((None, s, None, h), lambda bi, ni, i: (bi, 0, ni // g, 0))
    return _common.pallas_call(
        kernel,
        interpret=cfg.interpret,
        grid=(b, n, t // bq),
        in_specs=[
            q_spec,
            kv_spec,
            kv_spec,
            pl.BlockSpec((None, bq), lambda bi, ni, i: (bi, i)),
            pl.BlockSpec((None, s), lambda bi, ni, i: (bi, 0)),
        ],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda bi, ni, i: (bi, ni, i))],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, n, t), jnp.float32),
        ],
        name="flash_attention_fwd",
    )(q, k, v, q_seg, k_seg)


# ------------------------------------------------------------------------------------------------
# Backward.


def _dq_kernel(
    q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg, s_len
):
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    i = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_seg = qs_ref[...]
    q_idx = i * bq + jnp.arange(bq)
    prec = _precision(q.dtype)

    def body(j, dq):
        ks = pl.ds(j * bk, bk)
        k, v = k_ref[ks, :], v_ref[ks, :]
        s = _dot(q, k.T, prec) * cfg.scale
        mask = _mask(q_seg, ks_ref[ks], q_idx, j * bk + jnp.arange(bk), cfg.causal)
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, v.T, prec)
        ds = p * (dp - delta[:, None])  # dL/dscores, FA2 eq. for dS
        return dq + _dot(ds.astype(k.dtype), k, prec)

    num_k = s_len // bk
    if cfg.causal:
        num_k = jnp.minimum(num_k, lax.div((i + 1) * bq + bk - 1, bk))
    dq = lax.fori_loop(0, num_k, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg, t_len
):
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]  # [bk, H]
    k_seg = ks_ref[...]
    k_idx = j * bk + jnp.arange(bk)
    groups = q_ref.shape[1]
    prec = _precision(k.dtype)
    # Scores are computed transposed ([bk, bq]) so every dot below is a plain A @ B.

    def q_body(i, carry, g):
        dk, dv = carry
        ts = pl.ds(i * bq, bq)
        q, do = q_ref[ts, g, :], do_ref[ts, g, :]
        lse, delta = lse_ref[g, ts], delta_ref[g, ts]
        s_t = _dot(k, q.T, prec) * cfg.scale
        mask_t = _mask(qs_ref[ts], k_seg, i * bq + jnp.arange(bq), k_idx, cfg.causal).T
        p_t = jnp.where(mask_t, jnp.exp(s_t - lse[None, :]), 0.0)
        dv = dv + _dot(p_t.astype(do.dtype), do, prec)
        dp_t = _dot(v, do.T, prec)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = dk + _dot(ds_t.astype(q.dtype), q, prec)
        return dk, dv

    first = (j * bk) // bq if cfg.causal else 0  # query blocks wholly before this key block
    num_q = t_len // bq

    def g_body(g, carry):
        return lax.fori_loop(first, num_q, functools.partial(q_body, g=g), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, groups, g_body, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(q, k, v, q_seg, k_seg, out, lse, do, cfg: _Config):
    if cfg.backend == "tpu":
        return flash_attention_tpu.backward(q, k, v, q_seg, k_seg, out, lse, do, cfg)
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    # delta_t = rowsum(dO * O) (FA2 Alg. 2 line 4), cheap enough in XLA: [B, N, T].
    delta = jnp.einsum("BTNH,BTNH->BNT", do.astype(jnp.float32), out.astype(jnp.float32))

    q_blk = pl.BlockSpec((None, bq, None, h), lambda bi, ni, i: (bi, i, ni, 0))
    kv_full = pl.BlockSpec((None, s, None, h), lambda bi, ni, i: (bi, 0, ni // g, 0))
    row_blk = pl.BlockSpec((None, None, bq), lambda bi, ni, i: (bi, ni, i))
    dq = _common.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, s_len=s),
        interpret=cfg.interpret,
        grid=(b, n, t // bq),
        in_specs=[
            q_blk,
            kv_full,
            kv_full,
            pl.BlockSpec((None, bq), lambda bi, ni, i: (bi, i)),
            pl.BlockSpec((None, s), lambda bi, ni, i: (bi, 0)),
            q_blk,
            row_blk,
            row_blk,
        ],
        out_specs=q_blk,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="flash_attention_dq",
    )(q, k, v, q_seg, k_seg, do, lse, delta)

    # One program per (batch, kv head, key block) sees the G query heads of its group.
    q_group = pl.BlockSpec((None, t, g, h), lambda bi, ki, j: (bi, 0, ki, 0))
    kv_blk = pl.BlockSpec((None, bk, None, h), lambda bi, ki, j: (bi, j, ki, 0))
    row_group = pl.BlockSpec((None, g, t), lambda bi, ki, j: (bi, ki, 0))
    dk, dv = _common.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, t_len=t),
        interpret=cfg.interpret,
        grid=(b, kv_heads, s // bk),
        in_specs=[
            q_group,
            kv_blk,
            kv_blk,
            pl.BlockSpec((None, t), lambda bi, ki, j: (bi, 0)),
            pl.BlockSpec((None, bk), lambda bi, ki, j: (bi, j)),
            q_group,
            row_group,
            row_group,
        ],
        out_specs=[kv_blk, kv_blk],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        name="flash_attention_dkv",
    )(q, k, v, q_seg, k_seg, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, k_seg, cfg: _Config):
    return _forward(q, k, v, q_seg, k_seg, cfg)[0]


def _flash_fwd(q, k, v, q_seg, k_seg, cfg):
    out, lse = _forward(q, k, v, q_seg, k_seg, cfg)
    return out, (q, k, v, q_seg, k_seg, out, lse)


def _flash_bwd(cfg, residuals, do):
    q, k, v, q_seg, k_seg, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, q_seg, k_seg, out, lse, do, cfg)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------------------
# Public API.


def _block(requested: int | None, default: int, length: int, name: str, backend: str) -> int:
    block = default if requested is None else requested
    # TPU: the key block is the lane dim of the key segment-id tile, so a multiple of 128.
    smallest = 128 if backend == "tpu" else 16
    if block < smallest or block & (block - 1):
        raise ValueError(f"{name}={block} must be a power of two >= {smallest} ({backend} tiles)")
    # Short sequences get one block rounded up to a power of two, not a mostly-padding tile.
    return min(block, max(smallest, _common.next_power_of_2(length)))


def _check(q, k, v, q_segment_ids, kv_segment_ids):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(
            f"expected q [B, T, N, H], k = v [B, S, K, H]; got {q.shape}, {k.shape}, {v.shape}"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} differ in batch or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"num_heads={q.shape[2]} is not divisible by num_kv_heads={k.shape[2]}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if q_segment_ids is not None:
        if q_segment_ids.shape != q.shape[:2] or kv_segment_ids.shape != k.shape[:2]:
            raise ValueError(
                f"segment ids {q_segment_ids.shape}, {kv_segment_ids.shape} do not match "
                f"q [B, T] = {q.shape[:2]} and k [B, S] = {k.shape[:2]}"
            )


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    block_q_bwd: int | None = None,
    block_k_bwd: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Memory-efficient attention with a Pallas forward and backward (differentiable).

    Args:
      q: [B, T, N, H] queries; k, v: [B, S, K, H] keys and values, N divisible by K.
      causal: query t attends to keys s <= t (positions counted from 0 in both).
      q_segment_ids, kv_segment_ids: [B, T], [B, S] int ids; attention only within equal
        non-zero ids (0 = padding). Both or neither.
      sm_scale: score scale, default 1/sqrt(H).
      block_q, block_k, block_q_bwd, block_k_bwd: tile sizes (powers of two >= 16, >= 128 on
        TPU); default from `BLOCK_SIZES` for the backend, shrunk to the sequence for short ones.
      interpret: run in Pallas interpret mode; default True on CPU.

    Returns:
      [B, T, N, H] in q's dtype; rows with nothing to attend to are 0.
    """
    _check(q, k, v, q_segment_ids, kv_segment_ids)
    b, t, _, h = q.shape
    s = k.shape[1]
    scale = 1.0 / math.sqrt(h) if sm_scale is None else float(sm_scale)
    if h not in SUPPORTED_HEAD_DIMS:
        # Triton tiles want these head dims; others take the XLA path (same function).
        return reference_attention(
            q, k, v, causal=causal, q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids, sm_scale=scale,
        )  # fmt: skip
    interpret = _common.resolve_interpret(interpret)
    backend = _common.backend()
    defaults = BLOCK_SIZES.get(backend, BLOCK_SIZES["gpu"])
    cfg = _Config(
        causal=causal,
        scale=scale,
        block_q=_block(block_q, defaults[0], t, "block_q", backend),
        block_k=_block(block_k, defaults[1], s, "block_k", backend),
        block_q_bwd=_block(block_q_bwd, defaults[2], t, "block_q_bwd", backend),
        block_k_bwd=_block(block_k_bwd, defaults[3], s, "block_k_bwd", backend),
        interpret=interpret,
        backend=backend,
    )
    if q_segment_ids is None:
        q_segment_ids = jnp.ones((b, t), jnp.int32)
        kv_segment_ids = jnp.ones((b, s), jnp.int32)
    # Pad to whole blocks; padded keys and queries get segment 0, so they are masked out.
    t_pad = _common.round_up(t, max(cfg.block_q, cfg.block_q_bwd)) - t
    s_pad = _common.round_up(s, max(cfg.block_k, cfg.block_k_bwd)) - s
    seq_pad = ((0, 0), (0, t_pad), (0, 0), (0, 0))
    kv_pad = ((0, 0), (0, s_pad), (0, 0), (0, 0))
    out = _flash(
        jnp.pad(q, seq_pad),
        jnp.pad(k, kv_pad),
        jnp.pad(v, kv_pad),
        jnp.pad(q_segment_ids.astype(jnp.int32), ((0, 0), (0, t_pad))),
        jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, s_pad))),
        cfg,
    )
    return out[:, :t]


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
) -> jax.Array:
    """Plain-XLA attention, the same function as `flash_attention` (softmax in float32).

    Shapes and arguments as in `flash_attention`; fully masked query rows return 0.
    """
    _check(q, k, v, q_segment_ids, kv_segment_ids)
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(h) if sm_scale is None else float(sm_scale)
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    scores = scores.astype(jnp.float32) * scale
    mask = jnp.ones((b, t, s), bool)
    if causal:
        mask &= (jnp.arange(t)[:, None] >= jnp.arange(s)[None, :])[None]
    if q_segment_ids is not None:
        mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
        mask &= (kv_segment_ids != 0)[:, None, :]
    mask = mask[:, None, None]  # [B, 1, 1, T, S]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1) * jnp.any(mask, axis=-1, keepdims=True)
    out = jnp.einsum(
        "BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return out.reshape(b, t, n, h).astype(q.dtype)
