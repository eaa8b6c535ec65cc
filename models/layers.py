"""The one layer library: embeddings, norms, RoPE, attention, MLPs and the decoder block.

Einsum and shape letters, the same in every file: B batch, T query time, S key time, D embed,
F mlp, N query heads, K kv heads, G query heads per kv head (N = K * G), H head_dim, V vocab,
L layers.

Every parameter carries `logical_axes` metadata (e.g. ("embed", "mlp")); `parallel/` maps those
names to mesh axes. Activations are annotated with `constrain`, which is a no-op unless
`parallel/` has installed sharding rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig

# ------------------------------------------------------------------------------------------------
# Parameters and activation sharding hooks.

# Set by parallel.sharding.use_rules(): a function (array, logical axis names) -> array that
# applies with_sharding_constraint. Model code only ever names logical axes.
_ACTIVATION_CONSTRAINT: list[Callable[[jax.Array, tuple[str | None, ...]], jax.Array]] = []
# Set by parallel.pipeline.use_pipeline(): runs `scan_blocks`' layers as a pipeline, as
# run(layer, block_state, x, dropout_keys, batch_args) -> x.
_LAYER_STACK_RUNNER: list[Callable[..., jax.Array]] = []


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """Annotates an activation with logical axis names (a no-op outside a sharding context)."""
    if _ACTIVATION_CONSTRAINT:
        return _ACTIVATION_CONSTRAINT[-1](x, logical_axes)
    return x


def param(rngs: nnx.Rngs, init, shape, dtype, logical_axes: tuple[str, ...]) -> nnx.Param:
    """Creates a parameter whose metadata names its logical axes, one per dimension."""
    if len(shape) != len(logical_axes):
        raise ValueError(f"shape {shape} and logical axes {logical_axes} differ in rank")
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=logical_axes)


def normal(std: float):
    return jax.nn.initializers.normal(stddev=std)


def project(x: jax.Array, w: jax.Array, num_contract: int = 1) -> jax.Array:
    """Contracts the last `num_contract` dims of x with the first ones of w as one 2-D matmul.

    `project(x[B, T, D], w[D, N, H])` is einsum("BTD,DNH->BTNH"). Flattening to
    [B*T, D] @ [D, N*H] is free (a bitcast) and lets XLA:CPU differentiate the dot without the
    transposes it inserts for multi-batch-dim einsums (about 2x faster backward on CPU).
    """
    contract = math.prod(w.shape[:num_contract])
    lead = x.shape[: x.ndim - num_contract]
    y = x.reshape(-1, contract) @ w.reshape(contract, -1)
    return y.reshape(lead + w.shape[num_contract:])


def dense(
    x: jax.Array, weight, num_contract: int = 1, dtype=None, key: jax.Array | None = None
) -> jax.Array:
    """The one dispatch point of every linear projection: `project(x, weight)` for any weight.

    `weight` is a plain `nnx.Param` [*in, *out], or a module that computes the same product
    itself, called as `weight(x, num_contract, dtype, key)`: a weight-only quantized weight
    (models.quantize.QuantizedDense) or a LoRA wrapper of either (models.lora.LoRADense).

    Args:
      x: [..., *in] activations.
      weight: the weight, whose first `num_contract` dims contract with x's last ones.
      num_contract: contracted dims (2 for o_proj [N, H, D]).
      dtype: compute dtype (default x's).
      key: PRNG key for LoRA dropout (training); None disables it.

    Returns:
      [..., *out] in dtype.
    """
    dtype = dtype or x.dtype
    if isinstance(weight, nnx.Variable):
        return project(x, weight[...].astype(dtype), num_contract)
    return weight(x, num_contract, dtype, key)


def fold_key(key: jax.Array | None, index: int) -> jax.Array | None:
    """A distinct key per projection (LoRA dropout), or None when dropout is off."""
    return None if key is None else jax.random.fold_in(key, index)


# ------------------------------------------------------------------------------------------------
# Norms.


class RMSNorm(nnx.Module):
    """RMSNorm (Zhang & Sennrich 2019), computed in float32; Llama's `weight * x / rms(x)`."""

    def __init__(self, dim: int, eps: float, param_dtype, *, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, jax.nn.initializers.ones, (dim,), param_dtype, ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias (GPT-2), computed in float32."""

    def __init__(self, dim: int, eps: float, param_dtype, *, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, jax.nn.initializers.ones, (dim,), param_dtype, ("norm",))
        self.bias = param(rngs, jax.nn.initializers.zeros, (dim,), param_dtype, ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def make_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> RMSNorm | LayerNorm:
    cls = RMSNorm if cfg.norm == "rmsnorm" else LayerNorm
    return cls(cfg.embed_dim, cfg.norm_eps, cfg.weight_dtype, rngs=rngs)


# ------------------------------------------------------------------------------------------------
# Positions.


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
    """Inverse frequencies theta^(-2i/H), i < H/2 (RoFormer, Su et al. 2021, eq. 15)."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(
    x: jax.Array, positions: jax.Array, theta: float, rope_dim: int | None = None
) -> jax.Array:
    """Rotates pairs (x_i, x_{i + R/2}) by position * freq_i: the Llama / Hugging Face layout.

    Args:
      x: [B, T, N, H] queries or keys.
      positions: [B, T] integer positions.
      theta: RoPE base.
      rope_dim: rotate only the first R dims of each head (partial RoPE); None: all H.

    Returns:
      [B, T, N, H], same dtype as x.
    """
    if rope_dim is not None and rope_dim < x.shape[-1]:
        rotated = apply_rope(x[..., :rope_dim], positions, theta)
        return jnp.concatenate([rotated, x[..., rope_dim:]], axis=-1)
    head_dim = x.shape[-1]
    angles = positions[..., None].astype(jnp.float32) * rope_frequencies(head_dim, theta)
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]  # [B, T, 1, H/2]
    x32 = x.astype(jnp.float32)
    first, second = x32[..., : head_dim // 2], x32[..., head_dim // 2 :]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


def alibi_slopes(num_heads: int) -> jax.Array:
    """ALiBi's per-head slopes (Press et al. 2022): a geometric sequence 2^(-8i/n).

    For a head count that is not a power of two, the slopes of the nearest lower power of two
    are followed by every other slope of the next power of two (as BLOOM and the paper's code).
    """

    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    power = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(power)
    if power != num_heads:
        slopes += geometric(2 * power)[0::2][: num_heads - power]
    return jnp.asarray(slopes, jnp.float32)


def alibi_bias(
    num_heads: int, num_kv_heads: int, query_positions: jax.Array, key_positions: jax.Array
) -> jax.Array:
    """Additive attention bias slope_n * (s - t), shaped [B, K, G, T, S] for grouped heads."""
    distance = key_positions[:, None, :] - query_positions[:, :, None]  # [B, T, S]
    slopes = alibi_slopes(num_heads).reshape(num_kv_heads, num_heads // num_kv_heads)
    return slopes[None, :, :, None, None] * distance[:, None, None].astype(jnp.float32)


class Embed(nnx.Module):
    """Token embedding table, also usable as the tied LM head (`attend`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.dtype = cfg.compute_dtype
        self.embedding = param(
            rngs,
            normal(cfg.init_std),
            (cfg.vocab_size, cfg.embed_dim),
            cfg.weight_dtype,
            ("vocab", "embed"),
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """[B, T] int -> [B, T, D]."""
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> logits [B, T, V]."""
        return project(x, self.embedding[...].astype(self.dtype).T)


# ------------------------------------------------------------------------------------------------
# Attention.


class KVCache(NamedTuple):
    """Per-layer key/value cache. `key`/`value`: [B, S, K, H]; `index`: scalar write position.

    Stacked over layers (a leading L axis) when it lives in the scanned decoder.
    """

    key: jax.Array
    value: jax.Array
    index: jax.Array


class PagedKVCache(NamedTuple):
    """Paged key/value cache, shared by the rows of a batch (see infer/kv_cache.py).

    `key`/`value`: [L, P, C, K, H] pages of C slots each for every layer (int8, with
    `key_scale`/`value_scale` [L, P, C, K] float32, or a float dtype and no scales);
    `block_tables`: [B, M] the pages of each row in order; `lengths`: [B] tokens a row has
    cached before this call; `num_new`: [B] how many of the call's T tokens are real: the rest
    (padding, idle rows) are written to page 0, which the allocator never hands out. `layer` is
    set by the scanned decoder for the layer being run: the pages stay whole in the scan's carry,
    and each layer writes and reads its own in place (scanning them as per-layer slices would
    copy the whole cache at every step).
    """

    key: jax.Array
    value: jax.Array
    block_tables: jax.Array
    lengths: jax.Array
    num_new: jax.Array
    key_scale: jax.Array | None = None
    value_scale: jax.Array | None = None
    layer: jax.Array | int = 0


def paged_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, cache: PagedKVCache, cfg: ModelConfig
) -> tuple[jax.Array, PagedKVCache]:
    """Writes k, v [B, T, K, H] into their pages, then attends q [B, T, N, H] over each row.

    Query t of row b sits at position lengths[b] + t and sees the keys before it and itself.
    One new token per row under attention_impl "pallas" uses the paged decode kernel; otherwise
    the rows' pages of layer `cache.layer` are gathered (the plain-JAX reference) and masked.
    """
    from kernels.decode_attention import decode_attention, quantize_kv_int8

    b, t = k.shape[:2]
    num_pages, page_size = cache.key.shape[1:3]
    layer = cache.layer
    order = cache.lengths[:, None] + jnp.arange(t)[None, :]  # [B, T]
    real = jnp.arange(t)[None, :] < cache.num_new[:, None]
    logical = jnp.clip(order // page_size, 0, cache.block_tables.shape[1] - 1)
    page = jnp.where(real, jnp.take_along_axis(cache.block_tables, logical, axis=1), 0)
    slot = order % page_size
    if cache.key_scale is not None:
        (kq, ks), (vq, vs) = quantize_kv_int8(k), quantize_kv_int8(v)
        cache = cache._replace(
            key=cache.key.at[layer, page, slot].set(kq),
            value=cache.value.at[layer, page, slot].set(vq),
            key_scale=cache.key_scale.at[layer, page, slot].set(ks),
            value_scale=cache.value_scale.at[layer, page, slot].set(vs),
        )
    else:
        cache = cache._replace(
            key=cache.key.at[layer, page, slot].set(k.astype(cache.key.dtype)),
            value=cache.value.at[layer, page, slot].set(v.astype(cache.value.dtype)),
        )
    total = cache.lengths + cache.num_new  # [B]
    sm_scale = None if cfg.scale_attention else 1.0
    if t == 1 and cfg.position != "alibi" and attention_impl(cfg) == "pallas":
        scales = [None if x is None else x[layer] for x in (cache.key_scale, cache.value_scale)]
        out = decode_attention(
            q[:, 0], cache.key[layer], cache.value[layer], cache.block_tables, total,
            k_scales=scales[0], v_scales=scales[1], sm_scale=sm_scale,
        )  # fmt: skip
        return out[:, None], cache
    pages = jnp.clip(cache.block_tables, 0, num_pages - 1)
    s_len = pages.shape[1] * page_size

    def gather(x, scale):
        x = x[layer, pages]  # [B, M, C, K, H]: one gather, no copy of the layer's pages
        if scale is not None:
            x = x.astype(jnp.float32) * scale[layer, pages][..., None]
        return x.reshape(b, s_len, *x.shape[3:]).astype(q.dtype)

    keys, values = gather(cache.key, cache.key_scale), gather(cache.value, cache.value_scale)
    key_positions = jnp.broadcast_to(jnp.arange(s_len), (b, s_len))
    mask = make_attention_mask(order, key_positions, None, None, True)
    mask &= (key_positions < total[:, None])[:, None, None, None, :]
    bias = None
    if cfg.position == "alibi":
        bias = alibi_bias(cfg.num_heads, cfg.num_kv_heads, order, key_positions)
    return dot_product_attention(q, keys, values, mask, bias, cfg.scale_attention), cache


def make_attention_mask(
    query_positions: jax.Array,
    key_positions: jax.Array,
    query_segments: jax.Array | None,
    key_segments: jax.Array | None,
    causal: bool = True,
    prefix_len: jax.Array | None = None,
) -> jax.Array:
    """Boolean [B, 1, 1, T, S] mask: True where query t may attend to key s.

    Segment id 0 marks padding (attends to nothing, is attended by nothing); equal non-zero
    segment ids mark one packed sequence, so packed examples never see each other.
    `prefix_len` [B] makes a prefix LM (GLM): keys before it are seen by every query, so the
    prefix attends bidirectionally and what follows causally.
    """
    mask = jnp.ones(
        query_positions.shape[:1] + (query_positions.shape[1], key_positions.shape[1]), bool
    )
    if causal:
        visible = query_positions[:, :, None] >= key_positions[:, None, :]
        if prefix_len is not None:
            visible |= key_positions[:, None, :] < prefix_len[:, None, None]
        mask &= visible
    if query_segments is not None and key_segments is not None:
        mask &= query_segments[:, :, None] == key_segments[:, None, :]
        mask &= (key_segments != 0)[:, None, :]
    return mask[:, None, None, :, :]


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    bias: jax.Array | None = None,
    scale: bool = True,
) -> jax.Array:
    """Plain XLA attention with grouped heads; softmax in float32.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H] with N = K * G; mask: [B, 1, 1, T, S] bool.
      bias: added to the scaled scores, broadcastable to [B, K, G, T, S] (ALiBi, T5), or None.
      scale: divide the scores by sqrt(H) (T5 does not).

    Returns:
      [B, T, N, H].
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    if scale:
        scores = scores / math.sqrt(h)
    if bias is not None:
        scores = scores + bias
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    # A fully masked row (a padding query) becomes uniform, not NaN; its output is never used.
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


def attention_impl(cfg: ModelConfig) -> str:
    """The attention implementation cfg asks for, with "auto" resolved for this backend."""
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    on_gpu = jax.default_backend() == "gpu"
    return "pallas" if on_gpu and cfg.head_dim in (64, 128) else "xla"


class Attention(nnx.Module):
    """Multi-head attention with grouped KV heads (MHA / GQA / MQA), optional RoPE and cache.

    Self-attention by default; with `context` (cross-attention, T5's decoder) the keys and
    values come from the encoder's output instead.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        init, pd = normal(cfg.init_std), cfg.weight_dtype
        # Residual projections scaled by 1/sqrt(2L) (GPT-2 paper, section 2.3).
        out_init = normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
        self.q_proj = param(rngs, init, (d, n, h), pd, ("embed", "heads", "head_dim"))
        self.k_proj = param(rngs, init, (d, k, h), pd, ("embed", "kv_heads", "head_dim"))
        self.v_proj = param(rngs, init, (d, k, h), pd, ("embed", "kv_heads", "head_dim"))
        self.o_proj = param(rngs, out_init, (n, h, d), pd, ("heads", "head_dim", "embed"))
        zeros = jax.nn.initializers.zeros
        if cfg.qkv_bias:
            self.q_bias = param(rngs, zeros, (n, h), pd, ("heads", "head_dim"))
            self.k_bias = param(rngs, zeros, (k, h), pd, ("kv_heads", "head_dim"))
            self.v_bias = param(rngs, zeros, (k, h), pd, ("kv_heads", "head_dim"))
        if cfg.out_bias:
            self.o_bias = param(rngs, zeros, (d,), pd, ("embed",))

    def _project_qkv(self, x: jax.Array, context: jax.Array | None, lora_key=None):
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        weights = (self.q_proj, self.k_proj, self.v_proj)
        if not all(isinstance(w, nnx.Param) for w in weights):
            # Quantized or LoRA weights: three dispatched projections, no fused matmul.
            sources = (x, x, x) if context is None else (x, context, context)
            q, k, v = (
                dense(src, w, 1, dtype, fold_key(lora_key, i))
                for i, (src, w) in enumerate(zip(sources, weights, strict=True))
            )
        elif context is None:
            # One [D, N + 2K, H] matmul instead of three: fewer, larger dots (and gradients).
            qkv_proj = jnp.concatenate(
                [self.q_proj[...], self.k_proj[...], self.v_proj[...]], axis=1
            )
            qkv = project(x, qkv_proj.astype(dtype))  # [B, T, N + 2K, H]
            q, k, v = jnp.split(qkv, [cfg.num_heads, cfg.num_heads + cfg.num_kv_heads], axis=2)
        else:
            q = project(x, self.q_proj[...].astype(dtype))
            kv_proj = jnp.concatenate([self.k_proj[...], self.v_proj[...]], axis=1)
            k, v = jnp.split(project(context, kv_proj.astype(dtype)), 2, axis=2)
        if cfg.qkv_bias:
            q = q + self.q_bias[...].astype(dtype)
            k = k + self.k_bias[...].astype(dtype)
            v = v + self.v_bias[...].astype(dtype)
        return q, k, v

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        cache: KVCache | PagedKVCache | None = None,
        *,
        bias: jax.Array | None = None,
        context: jax.Array | None = None,
        context_mask: jax.Array | None = None,
        prefix_len: jax.Array | None = None,
        lora_key: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Self- or cross-attention.

        Args:
          x: [B, T, D] input.
          positions: [B, T] positions of x (absolute; offset by the cache index when decoding).
          segment_ids: [B, T] packing / padding ids (0 = padding), or None.
          cache: this layer's KVCache (the new keys/values are written at `cache.index`) or
            PagedKVCache (written into their pages, see `paged_attention`).
          bias: an additive score bias computed by the caller (T5's relative positions),
            broadcastable to [B, K, G, T, S].
          context: [B, S, D] encoder output to attend to (cross-attention; no cache, no RoPE).
          context_mask: [B, 1, 1, T, S] bool mask for the context (required with context).
          prefix_len: [B] prefix-LM boundary (see make_attention_mask). Causality then follows
            the order of the tokens in the sequence, not `positions`, which GLM repeats.
          lora_key: PRNG key for the dropout of LoRA-wrapped projections (training), or None.

        Returns:
          ([B, T, D] output, updated cache or None).
        """
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        q, k, v = self._project_qkv(x, context, lora_key)
        if context is not None:
            out = dot_product_attention(q, k, v, context_mask, bias, cfg.scale_attention)
            return self._out(out, lora_key), cache
        if cfg.position == "rope":
            q = apply_rope(q, positions, cfg.rope_theta, cfg.rope_dim)
            k = apply_rope(k, positions, cfg.rope_theta, cfg.rope_dim)
        q = constrain(q, ("batch", "seq", "heads", "head_dim"))
        if isinstance(cache, PagedKVCache):
            out, cache = paged_attention(q, k, v, cache, cfg)
            return self._out(out, lora_key), cache

        key_positions = positions
        if cache is None:
            order = positions
            if prefix_len is not None:
                order = jnp.broadcast_to(jnp.arange(x.shape[1]), positions.shape)
            mask = make_attention_mask(
                order, order, segment_ids, segment_ids, cfg.causal, prefix_len
            )
        else:
            # Decoding: write the new keys at the cursor, attend over every written slot.
            k_all = jax.lax.dynamic_update_slice_in_dim(
                cache.key, k.astype(cache.key.dtype), cache.index, 1
            )
            v_all = jax.lax.dynamic_update_slice_in_dim(
                cache.value, v.astype(cache.value.dtype), cache.index, 1
            )
            cache = KVCache(k_all, v_all, cache.index + x.shape[1])
            slots = jnp.arange(k_all.shape[1])[None, :]
            key_positions = jnp.broadcast_to(slots, (x.shape[0], k_all.shape[1]))
            # Causality by slot order: query t sits in slot cache.index + t (its `positions`
            # may differ, e.g. GLM's 2D positions).
            order = jnp.broadcast_to(
                cache.index - x.shape[1] + jnp.arange(x.shape[1]), positions.shape
            ).astype(key_positions.dtype)
            mask = make_attention_mask(order, key_positions, None, None, True, prefix_len)
            mask &= (slots < cache.index)[:, None, None, None, :]
            k, v = k_all.astype(dtype), v_all.astype(dtype)

        if cfg.position == "alibi":
            bias = alibi_bias(cfg.num_heads, cfg.num_kv_heads, positions, key_positions)
        plain = cache is None and bias is None and prefix_len is None
        impl = attention_impl(cfg) if plain else "xla"
        if impl == "pallas":
            from kernels.flash_attention import flash_attention

            out = flash_attention(
                q, k, v, causal=cfg.causal, q_segment_ids=segment_ids,
                kv_segment_ids=segment_ids, sm_scale=None if cfg.scale_attention else 1.0,
            )  # fmt: skip
        elif impl == "cudnn":
            if segment_ids is not None:
                raise ValueError("attention_impl='cudnn' does not take segment ids; use pallas")
            out = jax.nn.dot_product_attention(
                q, k, v, is_causal=cfg.causal, implementation="cudnn",
                scale=None if cfg.scale_attention else 1.0,
            )  # fmt: skip
        else:
            out = dot_product_attention(q, k, v, mask, bias, cfg.scale_attention)
        return self._out(out, lora_key), cache

    def _out(self, out: jax.Array, lora_key: jax.Array | None = None) -> jax.Array:
        dtype = self.cfg.compute_dtype
        out = dense(out, self.o_proj, 2, dtype, fold_key(lora_key, 3))  # [B, T, D]
        if self.cfg.out_bias:
            out = out + self.o_bias[...].astype(dtype)
        return out


# ------------------------------------------------------------------------------------------------
# MLPs.


class MLP(nnx.Module):
    """Feed-forward block: GELU (GPT-2) or SwiGLU (Shazeer 2020; Llama)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f, pd = cfg.embed_dim, cfg.mlp_dim, cfg.weight_dtype
        init = normal(cfg.init_std)
        out_init = normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
        zeros = jax.nn.initializers.zeros
        if cfg.gated_mlp:
            self.gate_proj = param(rngs, init, (d, f), pd, ("embed", "mlp"))
        self.up_proj = param(rngs, init, (d, f), pd, ("embed", "mlp"))
        self.down_proj = param(rngs, out_init, (f, d), pd, ("mlp", "embed"))
        if cfg.out_bias:
            self.up_bias = param(rngs, zeros, (f,), pd, ("mlp",))
            self.down_bias = param(rngs, zeros, (d,), pd, ("embed",))

    def __call__(self, x: jax.Array, lora_key: jax.Array | None = None) -> jax.Array:
        """[B, T, D] -> [B, T, D]; `lora_key` drives LoRA dropout (training) or is None."""
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        up = dense(x, self.up_proj, 1, dtype, fold_key(lora_key, 1))
        if cfg.out_bias:
            up = up + self.up_bias[...].astype(dtype)
        activation = cfg.mlp_activation
        if cfg.gated_mlp:
            gate = dense(x, self.gate_proj, 1, dtype, fold_key(lora_key, 0))
            gate = jax.nn.silu(gate) if activation == "swiglu" else jax.nn.gelu(gate, True)
            hidden = gate * up
        elif activation == "relu":
            hidden = jax.nn.relu(up)
        elif activation == "quick_gelu":  # OpenAI CLIP's sigmoid approximation of GELU
            hidden = up * jax.nn.sigmoid(1.702 * up)
        else:
            hidden = jax.nn.gelu(up, approximate=activation == "gelu")
        hidden = constrain(hidden, ("batch", "seq", "mlp"))
        out = dense(hidden, self.down_proj, 1, dtype, fold_key(lora_key, 2))
        if cfg.out_bias:
            out = out + self.down_bias[...].astype(dtype)
        return out


# ------------------------------------------------------------------------------------------------
# The block.


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout with an explicit key; identity when key is None (evaluation)."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Block(nnx.Module):
    """Transformer block.

    Pre-norm (GPT-2, Llama): x + attn(norm(x)), then x + mlp(norm(x)).
    Post-norm (BERT): norm(x + attn(x)), then norm(x + mlp(x)).
    With `cross_attention` (T5's decoder) a cross-attention sub-block over the encoder output
    sits between the two.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, cross_attention: bool = False):
        self.cfg = cfg
        self.attn_norm = make_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        if cross_attention:
            self.cross_norm = make_norm(cfg, rngs)
            self.cross_attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = make_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None,
        cache: KVCache | None,
        dropout_key: jax.Array | None,
        *,
        bias: jax.Array | None = None,
        context: jax.Array | None = None,
        context_mask: jax.Array | None = None,
        prefix_len: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        rate = self.cfg.dropout_rate
        num_keys = 2 if context is None else 3
        keys = (
            (None,) * 3 if dropout_key is None else (*jax.random.split(dropout_key, num_keys), None)
        )
        post = self.cfg.norm_placement == "post"
        # LoRA dropout (models/lora.py) draws from its own stream, one key per sub-block, so
        # the residual dropout keys above stay what they were without LoRA.
        lora_keys = (None,) * 3
        if dropout_key is not None:
            lora_keys = tuple(jax.random.split(jax.random.fold_in(dropout_key, 1), 3))

        def sublayer(x, norm, fn, key):
            if post:
                return norm(x + dropout(fn(x), rate, key))
            return x + dropout(fn(norm(x)), rate, key)

        def self_attention(h):
            nonlocal cache
            out, cache = self.attn(
                h, positions, segment_ids, cache, bias=bias, prefix_len=prefix_len,
                lora_key=lora_keys[0],
            )  # fmt: skip
            return out

        x = sublayer(x, self.attn_norm, self_attention, keys[0])
        if context is not None:

            def cross_attention(h):
                return self.cross_attn(
                    h, positions, context=context, context_mask=context_mask,
                    lora_key=lora_keys[2],
                )[0]  # fmt: skip

            x = sublayer(x, self.cross_norm, cross_attention, keys[2])
        x = sublayer(x, self.mlp_norm, lambda h: self.mlp(h, lora_keys[1]), keys[1])
        return constrain(x, ("batch", "seq", "embed")), cache


# ------------------------------------------------------------------------------------------------
# A stack of blocks, scanned.

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def stacked_blocks(
    cfg: ModelConfig, rngs: nnx.Rngs, num_layers: int | None = None, cross_attention: bool = False
) -> Block:
    """num_layers (default cfg.num_layers) blocks as one Block whose parameters have a leading
    [L] axis."""
    num_layers = num_layers or cfg.num_layers

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(
        in_axes=(0,),
        out_axes=0,
        transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"},
    )
    def make(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs=rngs, cross_attention=cross_attention)

    return make(rngs)


def scan_blocks(
    blocks: Block,
    x: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array | None,
    cache: KVCache | None,
    dropout_keys: jax.Array | None,
    **shared,
) -> tuple[jax.Array, KVCache | None]:
    """Runs stacked blocks over x with `jax.lax.scan`, rematerialised by cfg.remat_policy.

    Compile time does not grow with depth; `cfg.scan_unroll` layers run per loop iteration.
    `cache` and `dropout_keys` (one key per layer) are scanned along with the parameters;
    `shared` keyword arguments (bias, context, context_mask) reach every layer unchanged.
    """
    cfg = blocks.cfg
    graphdef, block_state = nnx.split(blocks)

    # The pipeline (parallel/pipeline.py) runs `layer` on microbatches: it passes their rows of
    # the per-example inputs as `batch_args`.
    def layer(x, per_layer, batch_args=(positions, segment_ids, shared)):
        state, layer_cache, key = per_layer
        block = nnx.merge(graphdef, state)
        return block(x, *batch_args[:2], layer_cache, key, **batch_args[2])

    if cfg.remat_policy != "none":
        layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat_policy])
    if _LAYER_STACK_RUNNER and cache is None:
        run = _LAYER_STACK_RUNNER[-1]
        return run(layer, block_state, x, dropout_keys, (positions, segment_ids, shared)), None
    num_layers = jax.tree.leaves(block_state)[0].shape[0]
    unroll = min(cfg.scan_unroll, num_layers)
    if not isinstance(cache, PagedKVCache):
        return jax.lax.scan(layer, x, (block_state, cache, dropout_keys), unroll=unroll)

    # Paged: the pages ride in the carry, whole, so each layer's writes happen in place.
    def paged_layer(carry, per_layer):
        x, pages = carry
        state, index, key = per_layer
        x, new = layer(x, (state, cache._replace(**pages, layer=index), key))
        return (x, {name: getattr(new, name) for name in pages}), None

    pages = {name: getattr(cache, name) for name in ("key", "value", "key_scale", "value_scale")}
    xs = (block_state, jnp.arange(num_layers), dropout_keys)
    (x, pages), _ = jax.lax.scan(paged_layer, (x, pages), xs, unroll=unroll)
    return x, cache._replace(**pages)
