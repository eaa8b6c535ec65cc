"""CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023): a vision and a text transformer
from the shared layer library, mapped into one embedding space.

Images are channels-last, [B, H, W, C] (Hugging Face's pixel_values are [B, C, H, W]). Both
towers are pre-LN stacks of `models.layers.Block`, each with its own `ModelConfig`; the vision
tower's `vocab_size` is a placeholder (it embeds patches, not tokens). Letters as in
models/layers.py, plus P patch size, C channels, E the shared embedding (projection) width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.encoder import l2_normalize
from models.layers import Embed, make_norm, normal, param, project, scan_blocks, stacked_blocks

POOLING_MODES = ("cls", "mean")


def tower_config(
    *,
    num_layers: int,
    embed_dim: int,
    num_heads: int,
    mlp_dim: int,
    max_seq_len: int,
    causal: bool,
    vocab_size: int = 1,
    mlp_activation: str = "quick_gelu",
    norm_eps: float = 1e-5,
    embed_norm: bool = False,
    **overrides,
) -> ModelConfig:
    """The ModelConfig of one CLIP tower: pre-LN, LayerNorm, learned positions, biases."""
    return ModelConfig(
        vocab_size=vocab_size,
        num_layers=num_layers,
        embed_dim=embed_dim,
        num_heads=num_heads,
        mlp_dim=mlp_dim,
        max_seq_len=max_seq_len,
        norm="layernorm",
        norm_eps=norm_eps,
        mlp_activation=mlp_activation,
        position="learned",
        qkv_bias=True,
        out_bias=True,
        causal=causal,
        embed_norm=embed_norm,
        architecture="encoder",
        **overrides,
    )


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Shape of a two-tower contrastive model.

    Attributes:
      vision: the image tower (causal=False; embed_norm is CLIP's pre-LayerNorm on the patches).
      text: the text tower (causal=True, as CLIP); vocab_size and max_seq_len are the text's.
      image_size: side of the square input images, in pixels.
      patch_size: side of a square patch (P); must divide image_size.
      num_channels: C (3 for RGB, 1 for grey digits).
      projection_dim: E, the width of the shared embedding space.
      pooling: the image vector: "cls" (a learned class token, CLIP) or "mean" (of the patches).
      eos_token_id: the text vector is the hidden state at the first eos token; None pools at
        the largest token id instead (OpenAI's original rule, transformers' eos_token_id == 2).
      logit_scale_init: initial log of the inverse temperature (CLIP: log(1 / 0.07)).
      logit_bias_init: initial logit bias (SigLIP: -10); None means no bias (CLIP).
    """

    vision: ModelConfig
    text: ModelConfig
    image_size: int
    patch_size: int
    num_channels: int = 3
    projection_dim: int = 512
    pooling: Literal["cls", "mean"] = "cls"
    eos_token_id: int | None = None
    logit_scale_init: float = math.log(1 / 0.07)
    logit_bias_init: float | None = None

    def __post_init__(self):
        size, patch = self.image_size, self.patch_size
        if isinstance(size, (tuple, list)):
            if len(size) != 2 or size[0] != size[1]:
                raise ValueError(
                    f"image_size={tuple(size)} is not square; the patch embedding takes square "
                    "images only (resize or crop them)"
                )
            object.__setattr__(self, "image_size", int(size[0]))
            size = self.image_size
        if isinstance(patch, (tuple, list)):
            if len(patch) != 2 or patch[0] != patch[1]:
                raise ValueError(f"patch_size={tuple(patch)} is not square; use one int")
            object.__setattr__(self, "patch_size", int(patch[0]))
            patch = self.patch_size
        if patch <= 0 or size <= 0 or size % patch:
            raise ValueError(
                f"image_size={size} is not divisible by patch_size={patch}: the patches must "
                "tile the image exactly"
            )
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling={self.pooling!r} is not one of {POOLING_MODES}")
        if self.vision.causal or not self.text.causal:
            raise ValueError("the vision tower must not be causal and the text tower must be")
        if self.vision.max_seq_len < self.num_positions:
            raise ValueError(
                f"vision max_seq_len={self.vision.max_seq_len} is below the "
                f"{self.num_positions} image positions"
            )
        if self.num_channels <= 0 or self.projection_dim <= 0:
            raise ValueError(
                f"num_channels={self.num_channels} and projection_dim={self.projection_dim} "
                "must be positive"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Image tokens: the patches, plus the class token when pooling is "cls"."""
        return self.num_patches + (self.pooling == "cls")


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """[B, H, W, C] -> [B, (H/P)*(W/P), P, P, C], patches in row-major order (as a strided conv)."""
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p, p, c)


class VisionTower(nnx.Module):
    """ViT (Dosovitskiy et al. 2021): patch embedding, class token or mean pooling, projection."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        v = cfg.vision
        p, c, d, pd = cfg.patch_size, cfg.num_channels, v.embed_dim, v.weight_dtype
        init = normal(v.init_std)
        self.patch_embed = param(
            rngs, init, (p, p, c, d), pd, ("patch", "patch", "channels", "embed")
        )
        if cfg.pooling == "cls":
            self.class_embed = param(rngs, init, (d,), pd, ("embed",))
        self.pos_embed = param(rngs, init, (cfg.num_positions, d), pd, ("seq", "embed"))
        if v.embed_norm:
            self.embed_norm = make_norm(v, rngs)
        self.blocks = stacked_blocks(v, rngs)
        self.final_norm = make_norm(v, rngs)  # on the pooled vector (CLIP's post_layernorm)
        self.projection = param(
            rngs, normal(d**-0.5), (d, cfg.projection_dim), pd, ("embed", "projection")
        )

    def features(self, images: jax.Array) -> jax.Array:
        """Pooled, normalised image features before the projection: [B, H, W, C] -> [B, D]."""
        cfg, v = self.cfg, self.cfg.vision
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images have shape {tuple(images.shape)}, but the vision tower takes "
                f"[batch, {expected[0]}, {expected[1]}, {expected[2]}] (channels last)"
            )
        dtype = v.compute_dtype
        patches = patchify(images.astype(dtype), cfg.patch_size)
        x = project(patches, self.patch_embed[...].astype(dtype), num_contract=3)  # [B, T, D]
        if cfg.pooling == "cls":
            cls = jnp.broadcast_to(self.class_embed[...].astype(dtype), x[:, :1].shape)
            x = jnp.concatenate([cls, x], axis=1)
        x = x + self.pos_embed[...].astype(dtype)[None]
        if v.embed_norm:
            x = self.embed_norm(x)
        b, t = x.shape[:2]
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x, _ = scan_blocks(self.blocks, x, positions, None, None, None)
        pooled = x[:, 0] if cfg.pooling == "cls" else x.mean(axis=1)
        return self.final_norm(pooled).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        """[B, H, W, C] -> projected (not normalised) image embeddings [B, E]."""
        return self.features(images) @ self.projection[...].astype(jnp.float32)


class TextTower(nnx.Module):
    """CLIP's text transformer: causal attention, pooled at the end-of-text token."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        t = cfg.text
        d, pd = t.embed_dim, t.weight_dtype
        self.embed = Embed(t, rngs=rngs)
        self.pos_embed = param(rngs, normal(t.init_std), (t.max_seq_len, d), pd, ("seq", "embed"))
        self.blocks = stacked_blocks(t, rngs)
        self.final_norm = make_norm(t, rngs)
        self.projection = param(
            rngs, normal(d**-0.5), (d, cfg.projection_dim), pd, ("embed", "projection")
        )

    def eos_index(self, tokens: jax.Array) -> jax.Array:
        """[B, T] -> [B]: where each text is pooled (its first eos token, or its largest id)."""
        if self.cfg.eos_token_id is None:
            return jnp.argmax(tokens, axis=-1)
        return jnp.argmax(tokens == self.cfg.eos_token_id, axis=-1)

    def features(self, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Pooled text features before the projection: [B, T] ids (+ [B, T] 0/1 mask) -> [B, D].

        Causality already hides padding after the eos token from it; the mask matters only
        for padding before it.
        """
        t = self.cfg.text
        b, seq = tokens.shape
        if seq > t.max_seq_len:
            raise ValueError(f"text length {seq} exceeds the text max_seq_len={t.max_seq_len}")
        x = self.embed(tokens) + self.pos_embed[...][:seq].astype(t.compute_dtype)[None]
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (b, seq))
        segment_ids = None if attention_mask is None else attention_mask.astype(jnp.int32)
        x, _ = scan_blocks(self.blocks, x, positions, segment_ids, None, None)
        x = self.final_norm(x)
        pooled = jnp.take_along_axis(x, self.eos_index(tokens)[:, None, None], axis=1)[:, 0]
        return pooled.astype(jnp.float32)

    def __call__(self, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """[B, T] -> projected (not normalised) text embeddings [B, E]."""
        return self.features(tokens, attention_mask) @ self.projection[...].astype(jnp.float32)


class LogitHead(nnx.Module):
    """The learnable temperature and (SigLIP) bias: logits = exp(scale) * cosine + bias.

    The log inverse temperature is named `scale` and the bias `bias`, so the optimizer's weight
    decay mask leaves both alone.
    """

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.scale = param(
            rngs, jax.nn.initializers.constant(cfg.logit_scale_init), (), jnp.float32, ()
        )
        if cfg.logit_bias_init is not None:
            self.bias = param(
                rngs, jax.nn.initializers.constant(cfg.logit_bias_init), (), jnp.float32, ()
            )

    def __call__(self, image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
        """Normalised [Bi, E], [Bt, E] -> logits_per_image [Bi, Bt]."""
        logits = jnp.exp(self.scale[...]) * (image_embeds @ text_embeds.T)
        if hasattr(self, "bias"):
            logits = logits + self.bias[...]
        return logits


class CLIP(nnx.Module):
    """Two towers and a logit head; `__call__` gives L2-normalised embeddings of both."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision = VisionTower(cfg, rngs=rngs)
        self.text = TextTower(cfg, rngs=rngs)
        self.logit = LogitHead(cfg, rngs=rngs)

    def encode_image(self, images: jax.Array) -> jax.Array:
        """[B, H, W, C] -> unit-norm image embeddings [B, E]."""
        return l2_normalize(self.vision(images))

    def encode_text(self, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """[B, T] token ids -> unit-norm text embeddings [B, E]."""
        return l2_normalize(self.text(tokens, attention_mask))

    def __call__(
        self, images: jax.Array, tokens: jax.Array, attention_mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """(unit-norm image embeddings [B, E], unit-norm text embeddings [B, E])."""
        return self.encode_image(images), self.encode_text(tokens, attention_mask)

    def logits(self, image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
        """logits_per_image [Bi, Bt] (its transpose is logits_per_text)."""
        return self.logit(image_embeds, text_embeds)
