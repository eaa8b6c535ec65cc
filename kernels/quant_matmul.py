"""Weight-only quantized matmul `x @ dequantize(w)` as a Pallas kernel, with quantizers.

Layout: x [..., K] (bf16 or fp32 activations), w logically [K, N] (in, out: the `project` layout
of models/layers.py), y [..., N] in x's dtype. Two formats, both in `QuantizedWeight`:

- int8: `values` int8 [K, N]; `scales` float32 [K / group_size, N]. group_size = K is one scale
  per output channel (`quantize_int8`); GGUF Q8_0 loads as group_size 32.
- int4: `values` uint8 [K / 2, N], two unsigned 4-bit values q in [0, 15] per byte; w = q * scale
  + offset with float32 `scales` and `offsets` [K / group_size, N] (group_size 32/64/128). Within
  a group of g rows, byte row j holds row j in its low nibble and row j + g/2 in its high nibble:
  GGUF's Q4 layout, so Q4_0 (offset = -8 * d) and Q4_1 (offset = m, its per-group min) load
  without repacking nibbles.

Algorithm: one program per (M block, N block) loops over K one group (or, per channel, one K
tile) at a time; the weights are never dequantized in memory: per group it computes
scale * (x_g @ q_g) + offset * sum(x_g), with the dots accumulated in float32. Backends: GPU via
Pallas' Triton lowering; TPU through Mosaic (kernels/quant_matmul_tpu.py: K as a grid axis, N and
K in multiples of 128, int4 K in multiples of 256); CPU in interpret mode (default there).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kernels import _common, quant_matmul_tpu

# (block_m for prefill, block_n, block_k for per-channel int8). Decode shapes (M <= 64) use the
# smallest power of two >= M (at least 16, the smallest Triton dot); untuned on hardware.
BLOCK_SIZES: dict[str, tuple[int, int, int]] = {
    "gpu": (64, 128, 128),
    "cpu": (128, 256, 256),
}
INT4_GROUP_SIZES = (32, 64, 128)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["values", "scales", "offsets"],
    meta_fields=["bits", "group_size"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A [K, N] weight in int8 or packed int4 form; see the module docstring for the layout."""

    values: jax.Array
    scales: jax.Array
    offsets: jax.Array | None
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        k = self.values.shape[0] * (2 if self.bits == 4 else 1)
        return k, self.values.shape[1]


# ------------------------------------------------------------------------------------------------
# Quantizers and the reference.


def quantize_int8(w: jax.Array, group_size: int | None = None) -> QuantizedWeight:
    """Symmetric int8, one scale per output channel (or per `group_size` rows): w ~ q * scale."""
    k, n = w.shape
    group_size = k if group_size is None else group_size
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of group_size={group_size}")
    groups = w.astype(jnp.float32).reshape(k // group_size, group_size, n)
    scale = jnp.max(jnp.abs(groups), axis=1) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(groups / scale[:, None]), -127, 127).astype(jnp.int8)
    return QuantizedWeight(q.reshape(k, n), scale, None, bits=8, group_size=group_size)


def quantize_int4(w: jax.Array, group_size: int = 128) -> QuantizedWeight:
    """Asymmetric int4 per group of `group_size` rows: q = round((w - min) / scale), 0..15."""
    k, n = w.shape
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size={group_size} must be one of {INT4_GROUP_SIZES}")
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of group_size={group_size}")
    groups = w.astype(jnp.float32).reshape(k // group_size, group_size, n)
    lo, hi = jnp.min(groups, axis=1), jnp.max(groups, axis=1)
    scale = jnp.where(hi > lo, (hi - lo) / 15.0, 1.0)
    q = jnp.clip(jnp.round((groups - lo[:, None]) / scale[:, None]), 0, 15).astype(jnp.uint8)
    return QuantizedWeight(_pack_int4(q), scale, lo, bits=4, group_size=group_size)


def _pack_int4(q: jax.Array) -> jax.Array:
    """[K / g, g, N] values 0..15 -> [K / 2, N] bytes (first half of a group in low nibbles)."""
    groups, g, n = q.shape
    halves = q.reshape(groups, 2, g // 2, n)
    return (halves[:, 0] | (halves[:, 1] << 4)).reshape(groups * g // 2, n)


def dequantize(w: QuantizedWeight) -> jax.Array:
    """float32 [K, N] values of a quantized weight."""
    k, n = w.shape
    g = w.group_size
    if w.bits == 8:
        q = w.values.astype(jnp.float32).reshape(k // g, g, n)
        return (q * w.scales[:, None]).reshape(k, n)
    packed = w.values.reshape(k // g, g // 2, n)
    q = jnp.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(jnp.float32)
    return (q * w.scales[:, None] + w.offsets[:, None]).reshape(k, n)


def reference_matmul(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """Plain-JAX `x @ dequantize(w)` in float32, returned in x's dtype: [..., K] -> [..., N]."""
    y = jnp.dot(x.astype(jnp.float32), dequantize(w), precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


# ------------------------------------------------------------------------------------------------
# GGUF blocks (models.gguf tensors, shape [out, in], blocks of 32 along `in`).


def from_gguf(tensor) -> QuantizedWeight:
    """A Q8_0 / Q4_0 / Q4_1 `models.gguf.GGUFTensor` [out, in] as a [in, out] QuantizedWeight."""
    layouts = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
    if tensor.ggml_type not in layouts or len(tensor.shape) != 2:
        raise ValueError(
            f"tensor {tensor.name!r}: only 2-D {'/'.join(layouts)} tensors convert to a "
            f"QuantizedWeight, got {tensor.ggml_type} {tensor.shape}"
        )
    out_dim, in_dim = tensor.shape
    if in_dim % 32:
        raise ValueError(f"tensor {tensor.name!r}: rows of {in_dim} are not whole 32-blocks")
    blocks = np.ascontiguousarray(tensor.raw).reshape(-1).view(np.uint8)
    expected = out_dim * in_dim // 32 * layouts[tensor.ggml_type]
    if blocks.size != expected:
        raise ValueError(f"tensor {tensor.name!r}: expected {expected} bytes, got {blocks.size}")
    blocks = blocks.reshape(out_dim, in_dim // 32, layouts[tensor.ggml_type])

    def f16(start):  # [out, in / 32] -> [in / 32, out] float32
        return blocks[:, :, start : start + 2].copy().view(np.float16)[..., 0].T.astype(np.float32)

    d = f16(0)
    if tensor.ggml_type == "Q8_0":
        q = blocks[:, :, 2:].copy().view(np.int8).reshape(out_dim, in_dim).T
        return QuantizedWeight(jnp.asarray(q), jnp.asarray(d), None, bits=8, group_size=32)
    start = 2 if tensor.ggml_type == "Q4_0" else 4
    packed = blocks[:, :, start:].reshape(out_dim, in_dim // 2).T  # same nibble order as ours
    offsets = -8.0 * d if tensor.ggml_type == "Q4_0" else f16(2)
    return QuantizedWeight(
        jnp.asarray(np.ascontiguousarray(packed)),
        jnp.asarray(d),
        jnp.asarray(offsets),
        bits=4,
        group_size=32,
    )


# ------------------------------------------------------------------------------------------------
# Kernels.


def _dot(a, b):
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=prec)


def _int8_kernel(x_ref, w_ref, s_ref, o_ref, *, group: int, block_k: int, k_len: int):
    per_channel = group == k_len
    step = block_k if per_channel else group

    def body(c, acc):
        ks = pl.ds(c * step, step)
        x = x_ref[:, ks]
        part = _dot(x, w_ref[ks, :].astype(x.dtype))
        return acc + (part if per_channel else part * s_ref[pl.ds(c, 1), :])

    acc = jnp.zeros(o_ref.shape, jnp.float32)
    acc = jax.lax.fori_loop(0, k_len // step, body, acc)
    if per_channel:
        acc = acc * s_ref[...]
    o_ref[...] = acc.astype(o_ref.dtype)


def _int4_kernel(x_ref, w_ref, s_ref, z_ref, o_ref, *, group: int, k_len: int):
    half = group // 2

    def body(c, acc):
        x_lo = x_ref[:, pl.ds(c * group, half)]
        x_hi = x_ref[:, pl.ds(c * group + half, half)]
        packed = w_ref[pl.ds(c * half, half), :].astype(jnp.int32)
        lo = (packed & 0x0F).astype(x_lo.dtype)
        hi = (packed >> 4).astype(x_lo.dtype)
        qx = _dot(x_lo, lo) + _dot(x_hi, hi)
        # sum_k x_k (q_k s + z) = s (x . q) + z sum_k x_k: no dequantized weight tile.
        x_sum = jnp.sum(x_lo.astype(jnp.float32), axis=1) + jnp.sum(x_hi.astype(jnp.float32), 1)
        return acc + qx * s_ref[pl.ds(c, 1), :] + x_sum[:, None] * z_ref[pl.ds(c, 1), :]

    acc = jax.lax.fori_loop(0, k_len // group, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _largest_dividing_block(n: int, limit: int, name: str) -> int:
    block = limit
    while block >= 16:
        if n % block == 0:
            return block
        block //= 2
    raise ValueError(f"{name}={n} must be a multiple of 16 for the quantized matmul kernel")


def quant_matmul(
    x: jax.Array,
    w: QuantizedWeight,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """`x @ dequantize(w)` with a Pallas kernel.

    Args:
      x: [..., K] activations, bfloat16 or float32.
      w: QuantizedWeight of logical shape [K, N].
      block_m, block_n, block_k: tiles (powers of two >= 16; on TPU block_n and block_k
        multiples of 128); block_k only for per-channel int8. Defaults from `BLOCK_SIZES`
        (`quant_matmul_tpu.BLOCK_SIZES` on TPU); block_n is shrunk to a divisor of N.
      interpret: Pallas interpret mode; default True on CPU.

    Returns:
      [..., N] in x's dtype.
    """
    k, n = w.shape
    if w.group_size != k and (w.group_size < 16 or w.group_size & (w.group_size - 1)):
        raise ValueError(f"group_size={w.group_size} must be K={k} or a power of two >= 16")
    if x.shape[-1] != k:
        raise ValueError(f"x [..., {x.shape[-1]}] does not match the weight's K={k}")
    if x.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"activations must be bfloat16 or float32, got {x.dtype}")
    interpret = _common.resolve_interpret(interpret)
    if _common.backend() == "tpu":
        y = quant_matmul_tpu.quant_matmul(
            x.reshape(-1, k), w, block_m=block_m, block_n=block_n, block_k=block_k,
            interpret=interpret,
        )  # fmt: skip
        return y.reshape(x.shape[:-1] + (n,))
    default_m, default_n, default_k = BLOCK_SIZES.get(_common.backend(), BLOCK_SIZES["gpu"])
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    bm = min(block_m or default_m, max(16, _common.next_power_of_2(m)))
    bn = _largest_dividing_block(n, block_n or default_n, "N")
    x2 = jnp.pad(x2, ((0, _common.round_up(m, bm) - m), (0, 0)))
    groups = k // w.group_size
    x_spec = pl.BlockSpec((bm, k), lambda i, j: (i, 0))
    w_spec = pl.BlockSpec((w.values.shape[0], bn), lambda i, j: (0, j))
    s_spec = pl.BlockSpec((groups, bn), lambda i, j: (0, j))
    if w.bits == 8:
        bk = _largest_dividing_block(k, block_k or default_k, "K")
        kernel = functools.partial(_int8_kernel, group=w.group_size, block_k=bk, k_len=k)
        in_specs, args = [x_spec, w_spec, s_spec], (x2, w.values, w.scales)
    else:
        kernel = functools.partial(_int4_kernel, group=w.group_size, k_len=k)
        in_specs, args = [x_spec, w_spec, s_spec, s_spec], (x2, w.values, w.scales, w.offsets)
    y = _common.pallas_call(
        kernel,
        interpret=interpret,
        grid=(x2.shape[0] // bm, n // bn),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((x2.shape[0], n), x.dtype),
        name=f"int{w.bits}_matmul",
    )(*args)
    return y[:m].reshape(lead + (n,))


def bytes_per_weight(w: QuantizedWeight) -> float:
    """Stored bytes per weight element (values, scales and offsets), for bandwidth accounting."""
    total = sum(a.size * a.dtype.itemsize for a in (w.values, w.scales, w.offsets) if a is not None)
    return total / math.prod(w.shape)
