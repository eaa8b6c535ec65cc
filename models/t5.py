"""T5 (Raffel et al. 2020; v1.1 and Flan-T5 layout): an encoder-decoder from the one layer library.

What makes it T5, as switches of `ModelConfig` and this module:
- positions are a learned bias per bucket of relative distance (`position="relative"`),
  computed once per stack and shared by all its layers (log-spaced buckets past
  `relative_buckets // 2`, bidirectional in the encoder, causal in the decoder);
- attention scores are not divided by sqrt(head_dim) (`scale_attention=False`);
- RMSNorm without bias, pre-norm, no biases anywhere; a gated-GELU MLP (`"geglu"`, v1.1) or
  ReLU (v1.0);
- each decoder block cross-attends to the encoder output, which is computed once and passed to
  every decoding step;
- the decoder output may be scaled before the head (`head_input_scale`: embed_dim^-0.5 in v1.0,
  whose head is the tied embedding; 1 in v1.1, whose head is its own matrix).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.layers import (
    Embed,
    KVCache,
    constrain,
    dropout,
    make_norm,
    normal,
    param,
    project,
    scan_blocks,
    stacked_blocks,
)


def relative_position_bucket(
    relative_position: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """T5's bucket of each relative distance (key position - query position).

    Half the buckets (per direction when bidirectional) hold exact distances 0..n/2-1; the rest
    cover distances up to max_distance logarithmically; farther ones share the last bucket.
    """
    bucket = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket += (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = jnp.maximum(-relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # The float log of 0 is never used (is_small there); clamp to keep it finite.
    scaled = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
    scaled = scaled / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
    return bucket + jnp.where(is_small, distance, large)


class T5(nnx.Module):
    """Encoder-decoder transformer. `model(tokens, decoder_tokens)` -> float32 logits.

    Use `encode` once and `decode` per step (with a cache from `init_cache`) to generate.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.architecture != "encoder_decoder":
            raise ValueError(f"T5 needs architecture='encoder_decoder', got {cfg.architecture!r}")
        if cfg.position != "relative" or not cfg.causal or cfg.norm_placement != "pre":
            raise ValueError(
                "T5 needs position='relative', causal=True (the decoder; the encoder is "
                f"bidirectional by construction) and pre-norm; got position={cfg.position!r}, "
                f"causal={cfg.causal}, norm_placement={cfg.norm_placement!r}"
            )
        self.cfg = cfg
        pd = cfg.weight_dtype
        self.embed = Embed(cfg, rngs=rngs)
        encoder_cfg = cfg.replace(causal=False)
        self.encoder = stacked_blocks(encoder_cfg, rngs)
        self.encoder_rel_bias = param(
            rngs, normal(cfg.init_std), (cfg.relative_buckets, cfg.num_heads), pd,
            ("relpos", "heads"),
        )  # fmt: skip
        self.encoder_norm = make_norm(cfg, rngs)
        self.decoder = stacked_blocks(cfg, rngs, self.num_decoder_layers, cross_attention=True)
        self.decoder_rel_bias = param(
            rngs, normal(cfg.init_std), (cfg.relative_buckets, cfg.num_heads), pd,
            ("relpos", "heads"),
        )  # fmt: skip
        self.decoder_norm = make_norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(
                rngs, normal(cfg.init_std), (cfg.embed_dim, cfg.vocab_size), pd, ("embed", "vocab")
            )

    @property
    def num_decoder_layers(self) -> int:
        return self.cfg.num_decoder_layers or self.cfg.num_layers

    def _position_bias(
        self, table: jax.Array, query_positions: jax.Array, key_positions: jax.Array, causal: bool
    ) -> jax.Array:
        """[B, K, G, T, S] bias from a [buckets, N] table."""
        cfg = self.cfg
        relative = key_positions[:, None, :] - query_positions[:, :, None]  # [B, T, S]
        buckets = relative_position_bucket(
            relative, not causal, cfg.relative_buckets, cfg.relative_max_distance
        )
        bias = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # [B, T, S, N]
        b, t, s, n = bias.shape
        bias = bias.transpose(0, 3, 1, 2)  # [B, N, T, S]
        return bias.reshape(b, cfg.num_kv_heads, n // cfg.num_kv_heads, t, s)

    def encode(
        self,
        tokens: jax.Array,
        attention_mask: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """[B, S] tokens (mask: 1 real, 0 padding) -> encoder output [B, S, D]."""
        cfg = self.cfg
        batch, seq = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        keys = _dropout_keys(dropout_key, cfg.num_layers)
        x = dropout(self.embed(tokens), cfg.dropout_rate, keys[0])
        bias = self._position_bias(self.encoder_rel_bias[...], positions, positions, False)
        segment_ids = None if attention_mask is None else attention_mask.astype(jnp.int32)
        x, _ = scan_blocks(self.encoder, x, positions, segment_ids, None, keys[1], bias=bias)
        x = dropout(self.encoder_norm(x), cfg.dropout_rate, keys[2])
        return constrain(x, ("batch", "seq", "embed"))

    def decode(
        self,
        tokens: jax.Array,
        encoded: jax.Array,
        encoder_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Decoder logits for [B, T] tokens given the encoder output.

        Args:
          tokens: [B, T] decoder input (starts with the decoder start token, T5's pad id 0).
          encoded: [B, S, D] from `encode`.
          encoder_mask: [B, S], 1 for real encoder tokens; None means no padding.
          cache: a stacked self-attention cache from `init_cache`, or None.
          dropout_key: enables dropout.

        Returns:
          float32 logits [B, T, V]; with a cache, (logits, updated cache).
        """
        cfg = self.cfg
        batch, seq = tokens.shape
        offset = 0 if cache is None else cache.index[0]
        positions = jnp.broadcast_to(offset + jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        if cache is None:
            key_positions = positions
        else:
            slots = jnp.arange(cache.key.shape[2], dtype=jnp.int32)
            key_positions = jnp.broadcast_to(slots, (batch, slots.shape[0]))
        bias = self._position_bias(self.decoder_rel_bias[...], positions, key_positions, True)
        if encoder_mask is None:
            encoder_mask = jnp.ones(encoded.shape[:2], jnp.int32)
        context_mask = (encoder_mask > 0)[:, None, None, None, :]
        keys = _dropout_keys(dropout_key, self.num_decoder_layers)
        x = dropout(self.embed(tokens), cfg.dropout_rate, keys[0])
        x, new_cache = scan_blocks(
            self.decoder, x, positions, None, cache, keys[1],
            bias=bias, context=encoded.astype(x.dtype), context_mask=context_mask,
        )  # fmt: skip
        x = dropout(self.decoder_norm(x), cfg.dropout_rate, keys[2])
        x = x * cfg.head_input_scale
        if cfg.tie_embeddings:
            logits = self.embed.attend(x)
        else:
            logits = project(x, self.lm_head[...].astype(x.dtype))
        logits = constrain(logits.astype(jnp.float32), ("batch", "seq", "vocab"))
        return logits if cache is None else (logits, new_cache)

    def __call__(
        self,
        tokens: jax.Array,
        decoder_tokens: jax.Array,
        attention_mask: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """Teacher-forced logits [B, T, V] of decoder_tokens given the encoder input tokens."""
        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        encoded = self.encode(tokens, attention_mask, keys[0])
        return self.decode(decoder_tokens, encoded, attention_mask, dropout_key=keys[1])

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty decoder self-attention cache: key/value [L_dec, B, S, K, H], index [L_dec]."""
        cfg = self.cfg
        shape = (self.num_decoder_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        dtype = dtype or cfg.compute_dtype
        return KVCache(
            jnp.zeros(shape, dtype),
            jnp.zeros(shape, dtype),
            jnp.zeros((self.num_decoder_layers,), jnp.int32),
        )


def _dropout_keys(key: jax.Array | None, num_layers: int):
    if key is None:
        return (None, None, None)
    first, layers, last = jax.random.split(key, 3)
    return first, jax.random.split(layers, num_layers), last
