"""Hugging Face CLIP checkpoints (CLIPModel: config.json + safetensors) -> our `models.clip.CLIP`.

CLIP has two towers, so its config and tensor table live here rather than in models/hf.py
(whose `config_from_hf` returns one ModelConfig); the table is built from hf.py's `Spec`
helpers, and loading is as strict: a missing, misshapen or unused tensor is an error naming it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.clip import CLIP, CLIPConfig, tower_config
from models.hf import (
    CheckpointError,
    Spec,
    _get,
    _get_path,
    _into,
    _out_of,
    _reshaped,
    _same,
    _set_path,
    read_config,
    read_weights,
)

_ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu_exact",
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
}
# Buffers a checkpoint may hold that no parameter takes.
_IGNORED = (r"(text|vision)_model\.embeddings\.position_ids",)


def clip_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> CLIPConfig:
    """Maps a CLIPModel config.json dict to a CLIPConfig (ModelConfig overrides go to both towers)."""
    if hf.get("model_type") != "clip":
        raise CheckpointError(f"expected model_type='clip', got {hf.get('model_type')!r}")
    text, vision = _get(hf, "text_config", {}), _get(hf, "vision_config", {})

    def tower(sub: Mapping[str, Any], causal: bool, **extra) -> dict:
        activation = _get(sub, "hidden_act", "quick_gelu")
        if activation not in _ACTIVATIONS:
            raise CheckpointError(f"unsupported checkpoint feature: hidden_act={activation}")
        return dict(
            num_layers=_get(sub, "num_hidden_layers", 12),
            embed_dim=_get(sub, "hidden_size", 512),
            num_heads=_get(sub, "num_attention_heads", 8),
            mlp_dim=_get(sub, "intermediate_size", 2048),
            mlp_activation=_ACTIVATIONS[activation],
            norm_eps=float(_get(sub, "layer_norm_eps", 1e-5)),
            causal=causal,
            **extra,
            **overrides,
        )

    image_size, patch_size = _get(vision, "image_size", 224), _get(vision, "patch_size", 32)
    num_positions = (image_size // patch_size) ** 2 + 1
    eos = _get(text, "eos_token_id", 2)
    try:
        return CLIPConfig(
            vision=tower_config(**tower(vision, False, max_seq_len=num_positions, embed_norm=True)),
            text=tower_config(
                **tower(
                    text,
                    True,
                    vocab_size=_get(text, "vocab_size", 49408),
                    max_seq_len=_get(text, "max_position_embeddings", 77),
                )
            ),
            image_size=image_size,
            patch_size=patch_size,
            num_channels=_get(vision, "num_channels", 3),
            projection_dim=_get(hf, "projection_dim", 512),
            pooling="cls",
            # transformers keeps OpenAI's argmax-of-ids pooling for configs with eos id 2.
            eos_token_id=None if eos == 2 else eos,
            logit_scale_init=float(_get(hf, "logit_scale_init_value", 2.6592)),
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json of a clip model is invalid: {e}") from e


def _tower_specs(prefix: str, ours: str, cfg) -> list[Spec]:
    n, h, f = cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    layer = f"{prefix}.encoder.layers.{{i}}."
    blocks = (ours, "blocks")
    specs = [
        _out_of(layer + "self_attn.out_proj.weight", (*blocks, "attn", "o_proj"), (n, h)),
        _same(layer + "self_attn.out_proj.bias", (*blocks, "attn", "o_bias")),
        _into(layer + "mlp.fc1.weight", (*blocks, "mlp", "up_proj"), (f,)),
        _same(layer + "mlp.fc1.bias", (*blocks, "mlp", "up_bias")),
        _out_of(layer + "mlp.fc2.weight", (*blocks, "mlp", "down_proj"), (f,)),
        _same(layer + "mlp.fc2.bias", (*blocks, "mlp", "down_bias")),
    ]
    for norm, theirs in (("attn_norm", "layer_norm1"), ("mlp_norm", "layer_norm2")):
        specs += [
            _same(f"{layer}{theirs}.weight", (*blocks, norm, "scale")),
            _same(f"{layer}{theirs}.bias", (*blocks, norm, "bias")),
        ]
    for x in "qkv":
        specs += [
            _into(f"{layer}self_attn.{x}_proj.weight", (*blocks, "attn", f"{x}_proj"), (n, h)),
            _reshaped(f"{layer}self_attn.{x}_proj.bias", (*blocks, "attn", f"{x}_bias"), (n, h)),
        ]
    return specs


def clip_specs(cfg: CLIPConfig) -> list[Spec]:
    """The CLIPModel tensor table: Hugging Face name -> our parameter path and layout."""
    e = cfg.projection_dim
    specs = _tower_specs("text_model", "text", cfg.text) + _tower_specs(
        "vision_model", "vision", cfg.vision
    )
    for prefix, ours, final in (("text_model", "text", "final_layer_norm"),
                                ("vision_model", "vision", "post_layernorm")):  # fmt: skip
        specs += [
            _same(f"{prefix}.{final}.weight", (ours, "final_norm", "scale")),
            _same(f"{prefix}.{final}.bias", (ours, "final_norm", "bias")),
        ]
    emb = "vision_model.embeddings."
    specs += [
        _same("text_model.embeddings.token_embedding.weight", ("text", "embed", "embedding")),
        _same("text_model.embeddings.position_embedding.weight", ("text", "pos_embed")),
        _same(emb + "class_embedding", ("vision", "class_embed")),
        _same(emb + "position_embedding.weight", ("vision", "pos_embed")),
        # A stride-P conv weight [D, C, P, P] is our patch matmul [P, P, C, D].
        Spec(
            emb + "patch_embedding.weight",
            (("vision", "patch_embed"),),
            lambda w: (w.transpose(2, 3, 1, 0),),
            lambda xs: xs[0].transpose(3, 2, 0, 1),
        ),
        _same("vision_model.pre_layrnorm.weight", ("vision", "embed_norm", "scale")),
        _same("vision_model.pre_layrnorm.bias", ("vision", "embed_norm", "bias")),
        _into("visual_projection.weight", ("vision", "projection"), (e,)),
        _into("text_projection.weight", ("text", "projection"), (e,)),
        Spec("logit_scale", (("logit", "scale"),), lambda w: (w.reshape(()),), lambda xs: xs[0]),
    ]
    return specs


def from_hf_tensors(cfg: CLIPConfig, tensors: Mapping[str, np.ndarray], source: str = "") -> CLIP:
    """Builds a CLIP for `cfg` from CLIPModel-named tensors; every tensor must be used."""
    where = f" in {source}" if source else ""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0))))
    shapes = nnx.to_pure_dict(state)
    params: dict = {}
    used = set()
    for spec in clip_specs(cfg):
        target = _get_path(shapes, spec.paths[0])
        layers = range(target.shape[0]) if spec.per_layer else [None]
        parts = []
        ours_shape = target.shape[1:] if spec.per_layer else target.shape
        expected = spec.to_hf((np.empty(ours_shape, np.float32),)).shape
        for i in layers:
            name = spec.hf_name.format(i=i)
            if name not in tensors:
                raise CheckpointError(f"missing tensor {name!r}{where}; expected shape {expected}")
            array = np.asarray(tensors[name])
            if array.shape != expected:
                raise CheckpointError(
                    f"tensor {name!r}{where} has shape {array.shape}, but the config expects "
                    f"{expected}"
                )
            parts.append(spec.to_ours(array)[0])
            used.add(name)
        value = np.stack(parts) if spec.per_layer else parts[0]
        _set_path(params, spec.paths[0], jnp.asarray(value, dtype=target.dtype))
    ignored = [re.compile(p) for p in _IGNORED]
    extra = sorted(n for n in tensors if n not in used and not any(p.fullmatch(n) for p in ignored))
    if extra:
        raise CheckpointError(
            f"{len(extra)} tensors{where} match no parameter of the CLIP model, e.g. {extra[:5]}"
        )
    missing = sorted(set(_leaf_paths(shapes)) - set(_leaf_paths(params)))
    if missing:
        raise CheckpointError(f"parameters not covered by the CLIP table: {missing}")
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _leaf_paths(tree) -> list[str]:
    return [
        "/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)
    ]


def load_clip_dir(path: str | os.PathLike, **overrides: Any) -> tuple[CLIP, dict]:
    """Loads a Hugging Face CLIPModel dir (config.json + safetensors): (model, config.json)."""
    hf = read_config(path)
    cfg = clip_config_from_hf(hf, **overrides)
    return from_hf_tensors(cfg, read_weights(path), str(path)), hf
