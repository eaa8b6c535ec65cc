"""A bidirectional transformer encoder (BERT, Devlin et al. 2019) from the same layer library.

BERT differs from the decoder in four switches of `ModelConfig`: attention is not causal
(`causal=False`), each block normalises after its residual add (`norm_placement="post"`), the
embeddings add a token-type (segment A/B) table and are normalised (`type_vocab_size`,
`embed_norm`), and the MLP uses the exact erf GELU (`mlp_activation="gelu_exact"`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.layers import Embed, constrain, make_norm, normal, param, scan_blocks, stacked_blocks


class Encoder(nnx.Module):
    """BERT-style encoder: tokens [B, T] (+ attention mask, token types) -> hidden [B, T, D]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.architecture != "encoder":
            raise ValueError(f"Encoder needs architecture='encoder', got {cfg.architecture!r}")
        if cfg.causal or cfg.position != "learned":
            raise ValueError(
                "Encoder needs causal=False and position='learned', got "
                f"causal={cfg.causal}, position={cfg.position!r}"
            )
        self.cfg = cfg
        self.embed = Embed(cfg, rngs=rngs)
        self.pos_embed = param(
            rngs,
            normal(cfg.init_std),
            (cfg.max_seq_len, cfg.embed_dim),
            cfg.weight_dtype,
            ("seq", "embed"),
        )
        if cfg.type_vocab_size:
            self.type_embed = param(
                rngs,
                normal(cfg.init_std),
                (cfg.type_vocab_size, cfg.embed_dim),
                cfg.weight_dtype,
                ("vocab", "embed"),
            )
        if cfg.embed_norm:
            self.embed_norm = make_norm(cfg, rngs)
        self.blocks = stacked_blocks(cfg, rngs)
        if cfg.norm_placement == "pre":
            self.final_norm = make_norm(cfg, rngs)

    def __call__(
        self,
        tokens: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Encodes a batch.

        Args:
          tokens: [B, T] int token ids.
          attention_mask: [B, T], 1 for real tokens and 0 for padding; None means no padding.
          token_type_ids: [B, T] segment ids into the token-type table; None means all 0.

        Returns:
          float32 hidden states [B, T, D]. Rows at padded positions are not meaningful.
        """
        cfg = self.cfg
        batch, seq = tokens.shape
        if seq > cfg.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds max_seq_len={cfg.max_seq_len}")
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        x = self.embed(tokens)
        x = x + self.pos_embed[...][:seq].astype(x.dtype)[None]
        if cfg.type_vocab_size:
            types = jnp.zeros_like(tokens) if token_type_ids is None else token_type_ids
            x = x + jnp.take(self.type_embed[...], types, axis=0).astype(x.dtype)
        if cfg.embed_norm:
            x = self.embed_norm(x)
        x = constrain(x, ("batch", "seq", "embed"))
        # Padding is segment 0: it attends to nothing and nothing attends to it.
        segment_ids = None if attention_mask is None else attention_mask.astype(jnp.int32)
        x, _ = scan_blocks(self.blocks, x, positions, segment_ids, None, None)
        if cfg.norm_placement == "pre":
            x = self.final_norm(x)
        return x.astype(jnp.float32)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Average of the hidden states over real (mask 1) tokens: [B, T, D], [B, T] -> [B, D]."""
    mask = attention_mask.astype(hidden.dtype)[..., None]
    return (hidden * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along the last axis (as torch.nn.functional.normalize)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


POOLING_MODES = ("mean", "cls", "max")


def pool(hidden: jax.Array, attention_mask: jax.Array, mode: str) -> jax.Array:
    """Sentence vector from token states: "mean" (masked), "cls" (first token) or "max"."""
    if mode == "mean":
        return mean_pool(hidden, attention_mask)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        masked = jnp.where(attention_mask[..., None] > 0, hidden, -jnp.inf)
        return masked.max(axis=1)
    raise ValueError(f"pooling mode {mode!r} is not one of {POOLING_MODES}")


def length_buckets(lengths: np.ndarray, multiple: int = 16) -> np.ndarray:
    """Rounds sequence lengths up to a multiple, so few distinct shapes get compiled."""
    return ((np.asarray(lengths) + multiple - 1) // multiple) * multiple
