"""One decoder-only transformer whose `ModelConfig` expresses GPT-2 and Llama-style models.

Layers are stacked along a leading `layers` axis and run with `jax.lax.scan`, so compile time
does not grow with depth; each block is rematerialised by `cfg.remat_policy`.
"""

from __future__ import annotations

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


class Decoder(nnx.Module):
    """GPT-2 / Llama / Qwen 2 / SmolLM2 decoder.

    Call with tokens [B, T] to get float32 logits [B, T, V]; pass a cache from `init_cache` to
    decode incrementally.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.architecture != "decoder":
            raise ValueError(f"Decoder needs architecture='decoder', got {cfg.architecture!r}")
        if not cfg.causal or cfg.norm_placement != "pre":
            raise ValueError(
                "Decoder needs causal=True and norm_placement='pre', got "
                f"causal={cfg.causal}, norm_placement={cfg.norm_placement!r}"
            )
        self.cfg = cfg
        self.embed = Embed(cfg, rngs=rngs)
        if cfg.position == "learned":
            self.pos_embed = param(
                rngs,
                normal(cfg.init_std),
                (cfg.max_seq_len, cfg.embed_dim),
                cfg.weight_dtype,
                ("seq", "embed"),
            )

        if cfg.block_positions:
            self.block_pos_embed = param(
                rngs,
                normal(cfg.init_std),
                (cfg.max_seq_len, cfg.embed_dim),
                cfg.weight_dtype,
                ("seq", "embed"),
            )
        if cfg.embed_norm:
            self.embed_norm = make_norm(cfg, rngs)
        self.blocks = stacked_blocks(cfg, rngs)  # every parameter has a leading [L] axis
        self.final_norm = make_norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(
                rngs,
                normal(cfg.init_std),
                (cfg.embed_dim, cfg.vocab_size),
                cfg.weight_dtype,
                ("embed", "vocab"),
            )

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        dropout_key: jax.Array | None = None,
        logits_positions: jax.Array | None = None,
        block_positions: jax.Array | None = None,
        prefix_len: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None] | jax.Array:
        """Runs the decoder.

        Args:
          tokens: [B, T] int token ids.
          positions: [B, T] positions; defaults to 0..T-1 (offset by `cache.index` when decoding).
            Packed sequences pass positions that restart at every segment.
          segment_ids: [B, T] packing ids, 0 = padding; None means one sequence per row.
          cache: a stacked KVCache from `init_cache` (leading L axis), or None.
          dropout_key: a PRNG key to enable dropout (training); None disables it.
          logits_positions: [B] or [B, P] indices into T: compute the logits only there,
            giving [B, 1, V] or [B, P, V] (prefill needs just the last real prompt position;
            fine-tuning just the positions its loss counts).
          block_positions: [B, T] positions inside a generated span (GLM; 0 in the context);
            used when cfg.block_positions, default all 0.
          prefix_len: [B] prefix-LM boundary: tokens before it attend to each other both ways,
            later ones causally (GLM's blank infilling); None: fully causal.

        Returns:
          float32 logits [B, T, V] when `cache` is None, else (logits, updated cache).
        """
        cfg = self.cfg
        batch, seq = tokens.shape
        if positions is None:
            offset = 0 if cache is None else cache.index[0]
            positions = jnp.broadcast_to(offset + jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        x = self.embed(tokens)
        if cfg.position == "learned":
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(x.dtype)
        keys = (None,) * 3
        if dropout_key is not None:
            keys = tuple(jax.random.split(dropout_key, 3))
            keys = (keys[0], jax.random.split(keys[1], cfg.num_layers), keys[2])
        if cfg.block_positions and block_positions is not None:
            x = x + jnp.take(self.block_pos_embed[...], block_positions, axis=0).astype(x.dtype)
        if cfg.embed_norm:
            x = self.embed_norm(x)
        x = dropout(x, cfg.dropout_rate, keys[0])
        x = constrain(x, ("batch", "seq", "embed"))

        shared = {} if prefix_len is None else {"prefix_len": prefix_len}
        x, new_cache = scan_blocks(self.blocks, x, positions, segment_ids, cache, keys[1], **shared)

        if logits_positions is not None:
            index = logits_positions[:, None] if logits_positions.ndim == 1 else logits_positions
            x = jnp.take_along_axis(x, index[..., None], axis=1)
        x = self.final_norm(x)
        if cfg.tie_embeddings:
            logits = self.embed.attend(x)
        else:
            logits = project(x, self.lm_head[...].astype(x.dtype))
        logits = constrain(logits.astype(jnp.float32), ("batch", "seq", "vocab"))
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, batch: int, max_len: int | None = None, dtype=None) -> KVCache:
        """An empty stacked cache: key/value [L, B, S, K, H], index [L] (all layers in step)."""
        cfg = self.cfg
        max_len = max_len or cfg.max_seq_len
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        dtype = dtype or cfg.compute_dtype
        return KVCache(
            jnp.zeros(shape, dtype),
            jnp.zeros(shape, dtype),
            jnp.zeros((cfg.num_layers,), jnp.int32),
        )


def logical_axes(state: nnx.State) -> nnx.State:
    """The logical axis names of every parameter in a model state, as a matching pytree."""
    return jax.tree.map(
        lambda v: v.get_metadata().get("logical_axes"),
        state,
        is_leaf=lambda v: isinstance(v, nnx.Variable),
    )
