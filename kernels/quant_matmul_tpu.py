"""The TPU (Mosaic) lowering of kernels/quant_matmul.py: `x @ dequantize(w)`, same formats.

Mosaic blocks need their last two dims divisible by (8, 128) (int8: (32, 128)) or equal to the
array's, so the reduction over K is a sequential grid axis with a float32 VMEM accumulator,
not a loop of dynamic slices inside one program. One K step is a lane tile of 128 columns of x
(or one whole group when groups are >= 128): the scales of the groups in it arrive as a small
[groups per step, block_n] block (the scales are reshaped so that block is legal), and each
group's partial product is a dot of x with the other groups' columns masked to 0. Masking
costs (groups per step) dots instead of one; these kernels serve decode, where reading the
weights, not the MXU, is the bound.

int4: x is split in XLA into the columns that meet the low and the high nibbles of each packed
byte row (GGUF's layout: row j and row j + g/2 of a group share a byte), so both halves are
plain [block_m, 128] x [128, block_n] dots on the unpacked nibbles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
# (block_m for prefill, block_n, block_k for per-channel int8); untuned on hardware.
BLOCK_SIZES = (128, 256, 512)


def _dot(a, b):
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=prec)


def _group_mask(shape, r: int, width: int):
    return lax.broadcasted_iota(jnp.int32, shape, 1) // width == r


def _accumulate(acc_ref, o_ref, part):
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    acc_ref[...] += part

    @pl.when(kk == pl.num_programs(2) - 1)
    def _finish():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _int8_kernel(x_ref, w_ref, s_ref, o_ref, acc_ref, *, group: int, per_channel: bool):
    x = x_ref[...]  # [bm, bk]
    w = w_ref[...].astype(x.dtype)  # int8 values are exact in bf16
    scales = s_ref[...]  # [groups in this step, bn], or [1, bn] per channel
    if per_channel:  # scaling each step's partial product is the same as scaling the sum
        part = _dot(x, w) * scales
    else:
        part = sum(
            _dot(jnp.where(_group_mask(x.shape, r, group), x, 0), w) * scales[r : r + 1]
            for r in range(scales.shape[0])
        )
    _accumulate(acc_ref, o_ref, part)


def _int4_kernel(xl_ref, xh_ref, w_ref, s_ref, z_ref, o_ref, acc_ref, *, half: int):
    x_lo, x_hi = xl_ref[...], xh_ref[...]  # [bm, 128]: columns of the low / high nibbles
    packed = w_ref[...].astype(jnp.int32)  # [128, bn]
    lo = (packed & 0x0F).astype(x_lo.dtype)
    hi = (packed >> 4).astype(x_lo.dtype)
    scales, offsets = s_ref[...], z_ref[...]  # [groups in this step, bn]
    part = jnp.zeros(acc_ref.shape, jnp.float32)
    for r in range(scales.shape[0]):
        mask = _group_mask(x_lo.shape, r, half)
        xl, xh = jnp.where(mask, x_lo, 0), jnp.where(mask, x_hi, 0)
        # sum_k x_k (q_k s + z) = s (x . q) + z sum_k x_k, per group.
        x_sum = jnp.sum(xl.astype(jnp.float32) + xh.astype(jnp.float32), axis=1, keepdims=True)
        part += (_dot(xl, lo) + _dot(xh, hi)) * scales[r : r + 1] + x_sum * offsets[r : r + 1]
    _accumulate(acc_ref, o_ref, part)


def _divisor_block(n: int, limit: int, name: str) -> int:
    block = limit
    while block >= LANES:
        if n % block == 0:
            return block
        block //= 2
    raise ValueError(f"{name}={n} must be a multiple of {LANES} for the TPU quantized matmul")


def quant_matmul(x2, w, *, block_m, block_n, block_k, interpret: bool):
    """[M, K] activations (any M) @ QuantizedWeight [K, N] -> [M, N] in x's dtype."""
    k, n = w.shape
    m = x2.shape[0]
    bm = min(block_m or BLOCK_SIZES[0], max(16, 1 << max(0, m - 1).bit_length()))
    if bm % 16:
        raise ValueError(f"block_m={bm} must be a multiple of 16 on TPU (bf16 sublane tiles)")
    bn = _divisor_block(n, block_n or BLOCK_SIZES[1], "N")
    x2 = jnp.pad(x2, ((0, -m % bm), (0, 0)))
    mp = x2.shape[0]
    g = w.group_size
    if w.bits == 8:
        per_channel = g == k
        if per_channel:
            bk = _divisor_block(k, block_k or BLOCK_SIZES[2], "K")
            scales = w.scales.reshape(1, 1, n)
        else:
            bk = max(g, LANES)
            if k % bk:
                raise ValueError(f"K={k} must be a multiple of {bk} for int8 groups of {g}")
            scales = w.scales.reshape(k // bk, bk // g, n)
        per_step = scales.shape[1]
        s_index = (lambda i, j, kk: (0, 0, j)) if per_channel else (lambda i, j, kk: (kk, 0, j))
        kernel = functools.partial(_int8_kernel, group=g, per_channel=per_channel)
        in_specs = [
            pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
            pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j)),
            pl.BlockSpec((None, per_step, bn), s_index),
        ]
        args = (x2, w.values, scales)
        steps = k // bk
    else:
        half = g // 2
        if k % (2 * LANES):
            raise ValueError(f"K={k} must be a multiple of {2 * LANES} for the TPU int4 kernel")
        halves = x2.reshape(mp, k // g, 2, half)
        x_lo = halves[:, :, 0].reshape(mp, k // 2)
        x_hi = halves[:, :, 1].reshape(mp, k // 2)
        per_step = LANES // half
        scales = w.scales.reshape(k // 2 // LANES, per_step, n)
        offsets = w.offsets.reshape(k // 2 // LANES, per_step, n)
        kernel = functools.partial(_int4_kernel, half=half)
        x_spec = pl.BlockSpec((bm, LANES), lambda i, j, kk: (i, kk))
        s_spec = pl.BlockSpec((None, per_step, bn), lambda i, j, kk: (kk, 0, j))
        in_specs = [x_spec, x_spec, pl.BlockSpec((LANES, bn), lambda i, j, kk: (kk, j))]
        in_specs += [s_spec, s_spec]
        args = (x_lo, x_hi, w.values, scales, offsets)
        steps = k // 2 // LANES
    y = pl.pallas_call(
        kernel,
        grid=(mp // bm, n // bn, steps),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, n), x2.dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name=f"int{w.bits}_matmul_tpu",
    )(*args)
    return y[:m]
