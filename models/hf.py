"""Hugging Face checkpoints: config.json + safetensors <-> our `ModelConfig` and parameters.

One table per architecture (`_specs`) says which Hugging Face tensor becomes which of our
parameters and how (transpose, split heads, split a fused projection). The same table runs
forwards to load and backwards to export, so the two cannot disagree.

Architectures: llama (Llama 2/3, SmolLM2), qwen2, gpt2, bloom (ALiBi), bert, and, for loading
only, glm (GLM-4: partial interleaved RoPE, fused gate/up) and t5 (v1.0, v1.1, Flan-T5). Loading is strict: a missing tensor, a tensor of the wrong shape, or a tensor
that no parameter takes is an error naming it, never silently a random or dropped weight.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import safetensors_io
from models.config import ModelConfig
from models.decoder import Decoder
from models.encoder import Encoder

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "glm", "gpt2", "bloom", "bert", "t5")
DECODER_ARCHITECTURES = ("llama", "qwen2", "gpt2", "bloom")


class CheckpointError(ValueError):
    """A checkpoint that does not match its config or cannot be read."""


# ------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig.


def _get(hf: Mapping[str, Any], key: str, default: Any = None, required: bool = False) -> Any:
    if key in hf and hf[key] is not None:
        return hf[key]
    if required:
        raise CheckpointError(f"config.json of a {hf.get('model_type')} model has no {key!r}")
    return default


def _reject(condition: bool, what: str) -> None:
    if condition:
        raise CheckpointError(f"unsupported checkpoint feature: {what}")


def config_from_hf(
    hf: Mapping[str, Any], tensor_names: Collection[str] | None = None, **overrides: Any
) -> tuple[str, ModelConfig]:
    """Maps a Hugging Face config.json dict to (model_type, ModelConfig).

    Args:
      hf: the parsed config.json.
      tensor_names: the checkpoint's tensor names, where the config alone is ambiguous (T5:
        whether the head is its own matrix).
      **overrides: ModelConfig fields to set on top (e.g. dtype, param_dtype, max_seq_len).

    Raises:
      CheckpointError: unknown model_type, a missing key, or a feature we do not implement
        (e.g. RoPE scaling, sliding-window attention), named.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"unsupported architecture model_type={model_type!r}; supported: "
            f"{list(SUPPORTED_ARCHITECTURES)}"
        )
    if model_type in ("llama", "qwen2", "glm"):
        heads = _get(hf, "num_attention_heads", required=True)
        hidden = _get(hf, "hidden_size", required=True)
        # transformers >= 5 writes rope_parameters (theta and scaling); older ones rope_theta
        # and rope_scaling.
        rope = {**(_get(hf, "rope_scaling") or {}), **(_get(hf, "rope_parameters") or {})}
        for key in ("rope_scaling", "rope_parameters"):
            settings = _get(hf, key) or {}
            kind = settings.get("rope_type", settings.get("type", "default"))
            _reject(kind != "default", f"RoPE scaling {key}={settings}")
        rope_theta = rope.get("rope_theta", _get(hf, "rope_theta", 10000.0))
        _reject(_get(hf, "hidden_act", "silu") != "silu", f"hidden_act={hf.get('hidden_act')}")
        _reject(bool(_get(hf, "mlp_bias", False)), "mlp_bias=True")
        if model_type == "llama":
            _reject(bool(_get(hf, "attention_bias", False)), "attention_bias=True")
        elif model_type == "qwen2":
            _reject(bool(_get(hf, "use_sliding_window", False)), "use_sliding_window=True")
        values = dict(
            vocab_size=_get(hf, "vocab_size", required=True),
            num_layers=_get(hf, "num_hidden_layers", required=True),
            embed_dim=hidden,
            num_heads=heads,
            num_kv_heads=_get(hf, "num_key_value_heads", heads),
            head_dim=_get(hf, "head_dim", hidden // heads),
            mlp_dim=_get(hf, "intermediate_size", required=True),
            max_seq_len=_get(hf, "max_position_embeddings", 2048),
            norm="rmsnorm",
            norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
            mlp_activation="swiglu",
            position="rope",
            rope_theta=float(rope_theta),
            qkv_bias=model_type == "qwen2",
            tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
        )
        if model_type == "glm":
            head_dim = values["head_dim"] = _get(hf, "head_dim", 128)
            factor = rope.get("partial_rotary_factor", _get(hf, "partial_rotary_factor", 0.5))
            values["rope_dim"] = int(head_dim * factor)
            values["qkv_bias"] = bool(_get(hf, "attention_bias", True))
    elif model_type == "gpt2":
        embed = _get(hf, "n_embd", required=True)
        activation = _get(hf, "activation_function", "gelu_new")
        _reject(activation not in ("gelu_new", "gelu_pytorch_tanh"), f"activation {activation}")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            _reject(bool(_get(hf, flag, False)), f"{flag}=True")
        _reject(not _get(hf, "scale_attn_weights", True), "scale_attn_weights=False")
        values = dict(
            vocab_size=_get(hf, "vocab_size", required=True),
            num_layers=_get(hf, "n_layer", required=True),
            embed_dim=embed,
            num_heads=_get(hf, "n_head", required=True),
            mlp_dim=_get(hf, "n_inner", 4 * embed),
            max_seq_len=_get(hf, "n_positions", 1024),
            norm="layernorm",
            norm_eps=float(_get(hf, "layer_norm_epsilon", 1e-5)),
            mlp_activation="gelu",
            position="learned",
            qkv_bias=True,
            out_bias=True,
            tie_embeddings=True,
        )
    elif model_type == "bloom":
        hidden = _get(hf, "hidden_size", _get(hf, "n_embed"))
        _reject(hidden is None, "config.json of a bloom model has no hidden_size")
        _reject(
            bool(_get(hf, "apply_residual_connection_post_layernorm", False)),
            "apply_residual_connection_post_layernorm=True",
        )
        values = dict(
            vocab_size=_get(hf, "vocab_size", required=True),
            num_layers=_get(hf, "n_layer", required=True),
            embed_dim=hidden,
            num_heads=_get(hf, "n_head", required=True),
            mlp_dim=4 * hidden,
            # ALiBi has no position table; this only bounds caches and prompts.
            max_seq_len=_get(hf, "seq_length", 2048),
            norm="layernorm",
            norm_eps=float(_get(hf, "layer_norm_epsilon", 1e-5)),
            mlp_activation="gelu",
            position="alibi",
            qkv_bias=True,
            out_bias=True,
            tie_embeddings=True,
            embed_norm=True,
        )
    elif model_type == "t5":
        projection = _get(hf, "feed_forward_proj", "relu")
        activations = {"relu": "relu", "gated-gelu": "geglu"}
        _reject(projection not in activations, f"feed_forward_proj={projection}")
        values = dict(
            vocab_size=_get(hf, "vocab_size", required=True),
            num_layers=_get(hf, "num_layers", required=True),
            num_decoder_layers=_get(hf, "num_decoder_layers", _get(hf, "num_layers")),
            embed_dim=_get(hf, "d_model", required=True),
            num_heads=_get(hf, "num_heads", required=True),
            head_dim=_get(hf, "d_kv", required=True),
            mlp_dim=_get(hf, "d_ff", required=True),
            # Relative positions have no table; this only bounds caches and inputs.
            max_seq_len=_get(hf, "n_positions", 512),
            norm="rmsnorm",
            norm_eps=float(_get(hf, "layer_norm_epsilon", 1e-6)),
            mlp_activation=activations[projection],
            position="relative",
            relative_buckets=_get(hf, "relative_attention_num_buckets", 32),
            relative_max_distance=_get(hf, "relative_attention_max_distance", 128),
            scale_attention=False,
            architecture="encoder_decoder",
        )
        # transformers < 5 wrote tie_word_embeddings=False for v1.1 (own head, no output
        # scaling); transformers 5 writes scale_decoder_outputs and always ties, saving no
        # lm_head. So: the head is tied exactly when the checkpoint has no lm_head.weight.
        tied = bool(_get(hf, "tie_word_embeddings", True))
        if tensor_names is not None:
            tied = "lm_head.weight" not in tensor_names
        scaled = _get(hf, "scale_decoder_outputs", _get(hf, "tie_word_embeddings", True))
        values["tie_embeddings"] = tied
        values["head_input_scale"] = values["embed_dim"] ** -0.5 if scaled else 1.0
    else:  # bert
        activation = _get(hf, "hidden_act", "gelu")
        activations = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}
        _reject(activation not in activations, f"hidden_act={activation}")
        position_type = _get(hf, "position_embedding_type", "absolute")
        _reject(position_type != "absolute", f"position_embedding_type={position_type}")
        values = dict(
            vocab_size=_get(hf, "vocab_size", required=True),
            num_layers=_get(hf, "num_hidden_layers", required=True),
            embed_dim=_get(hf, "hidden_size", required=True),
            num_heads=_get(hf, "num_attention_heads", required=True),
            mlp_dim=_get(hf, "intermediate_size", required=True),
            max_seq_len=_get(hf, "max_position_embeddings", 512),
            norm="layernorm",
            norm_eps=float(_get(hf, "layer_norm_eps", 1e-12)),
            mlp_activation=activations[activation],
            position="learned",
            qkv_bias=True,
            out_bias=True,
            tie_embeddings=True,  # no LM head
            norm_placement="post",
            causal=False,
            type_vocab_size=_get(hf, "type_vocab_size", 2),
            embed_norm=True,
            architecture="encoder",
        )
    values.update(overrides)
    try:
        return model_type, ModelConfig(**values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json of a {model_type} model is invalid: {e}") from e


def architecture_of(cfg: ModelConfig) -> str:
    """The Hugging Face model_type a decoder config exports as, or CheckpointError."""
    if cfg.causal and cfg.norm_placement == "pre":
        if (cfg.norm, cfg.mlp_activation, cfg.position) == ("rmsnorm", "swiglu", "rope"):
            if not cfg.out_bias:
                return "qwen2" if cfg.qkv_bias else "llama"
        gpt2_like = cfg.tie_embeddings and cfg.head_dim * cfg.num_heads == cfg.embed_dim
        gpt2_like &= cfg.num_kv_heads == cfg.num_heads and cfg.qkv_bias == cfg.out_bias
        if gpt2_like and (cfg.norm, cfg.mlp_activation) == ("layernorm", "gelu"):
            if cfg.position == "learned" and not cfg.embed_norm:
                return "gpt2"
            if cfg.position == "alibi" and cfg.embed_norm and cfg.mlp_dim == 4 * cfg.embed_dim:
                return "bloom"
    raise CheckpointError(
        "this config matches no Hugging Face decoder architecture we export "
        f"({list(DECODER_ARCHITECTURES)}): norm={cfg.norm}, mlp={cfg.mlp_activation}, "
        f"position={cfg.position}, qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias}, "
        f"tied={cfg.tie_embeddings}, heads={cfg.num_heads}/{cfg.num_kv_heads}"
    )


def config_to_hf(cfg: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
    """The config.json that transformers needs to rebuild `cfg`'s architecture."""
    model_type = model_type or architecture_of(cfg)
    if model_type in ("llama", "qwen2"):
        hf = {
            "architectures": ["LlamaForCausalLM" if model_type == "llama" else "Qwen2ForCausalLM"],
            "model_type": model_type,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.embed_dim,
            "intermediate_size": cfg.mlp_dim,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "tie_word_embeddings": cfg.tie_embeddings,
        }
        if model_type == "llama":
            hf.update(attention_bias=False, mlp_bias=False)
        else:
            hf.update(use_sliding_window=False)
    elif model_type == "gpt2":
        hf = {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.embed_dim,
            "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads,
            "n_inner": cfg.mlp_dim,
            "n_positions": cfg.max_seq_len,
            "n_ctx": cfg.max_seq_len,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "tie_word_embeddings": True,
        }
    elif model_type == "bloom":
        hf = {
            "architectures": ["BloomForCausalLM"],
            "model_type": "bloom",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.embed_dim,
            "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads,
            "layer_norm_epsilon": cfg.norm_eps,
            "seq_length": cfg.max_seq_len,
            "apply_residual_connection_post_layernorm": False,
            "tie_word_embeddings": True,
        }
    else:
        raise CheckpointError(f"export to {model_type!r} is not supported")
    hf["torch_dtype"] = cfg.param_dtype
    return hf


# ------------------------------------------------------------------------------------------------
# The tensor tables.


@dataclasses.dataclass(frozen=True)
class Spec:
    """One Hugging Face tensor and the parameter(s) of ours it holds.

    Attributes:
      hf_name: the tensor's name; "{i}" stands for the layer index in per-layer tensors.
      paths: our parameter paths (tuples of attribute names) it maps to; several for a fused
        tensor (GPT-2's c_attn holds q, k and v).
      to_ours: HF array -> tuple of our arrays (one per path, without the layer axis).
      to_hf: tuple of our arrays -> the HF array.
      optional: absent is fine (our parameter is then zero, e.g. GPT-2 biases on export).
    """

    hf_name: str
    paths: tuple[tuple[str, ...], ...]
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[[tuple[np.ndarray, ...]], np.ndarray]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name


def _same(name: str, path: tuple[str, ...]) -> Spec:
    return Spec(name, (path,), lambda w: (w,), lambda xs: xs[0])


def _into(name: str, path: tuple[str, ...], split: tuple[int, ...]) -> Spec:
    """A torch Linear weight [out, in] -> ours [in, *split] (split = out's factors)."""
    return Spec(
        name,
        (path,),
        lambda w: (w.T.reshape(w.shape[1], *split),),
        lambda xs: xs[0].reshape(xs[0].shape[0], -1).T,
    )


def _out_of(name: str, path: tuple[str, ...], split: tuple[int, ...]) -> Spec:
    """A torch Linear weight [out, in] -> ours [*split, out] (split = in's factors)."""
    return Spec(
        name,
        (path,),
        lambda w: (w.T.reshape(*split, w.shape[0]),),
        lambda xs: xs[0].reshape(-1, xs[0].shape[-1]).T,
    )


def _reshaped(name: str, path: tuple[str, ...], shape: tuple[int, ...]) -> Spec:
    return Spec(name, (path,), lambda w: (w.reshape(shape),), lambda xs: xs[0].reshape(-1))


def _llama_specs(cfg: ModelConfig) -> list[Spec]:
    n, k, h, f = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    layer = "model.layers.{i}."
    specs = [
        _same("model.embed_tokens.weight", ("embed", "embedding")),
        _same(layer + "input_layernorm.weight", ("blocks", "attn_norm", "scale")),
        _into(layer + "self_attn.q_proj.weight", ("blocks", "attn", "q_proj"), (n, h)),
        _into(layer + "self_attn.k_proj.weight", ("blocks", "attn", "k_proj"), (k, h)),
        _into(layer + "self_attn.v_proj.weight", ("blocks", "attn", "v_proj"), (k, h)),
        _out_of(layer + "self_attn.o_proj.weight", ("blocks", "attn", "o_proj"), (n, h)),
        _same(layer + "post_attention_layernorm.weight", ("blocks", "mlp_norm", "scale")),
        _into(layer + "mlp.gate_proj.weight", ("blocks", "mlp", "gate_proj"), (f,)),
        _into(layer + "mlp.up_proj.weight", ("blocks", "mlp", "up_proj"), (f,)),
        _out_of(layer + "mlp.down_proj.weight", ("blocks", "mlp", "down_proj"), (f,)),
        _same("model.norm.weight", ("final_norm", "scale")),
    ]
    if cfg.qkv_bias:
        specs += [
            _reshaped(layer + "self_attn.q_proj.bias", ("blocks", "attn", "q_bias"), (n, h)),
            _reshaped(layer + "self_attn.k_proj.bias", ("blocks", "attn", "k_bias"), (k, h)),
            _reshaped(layer + "self_attn.v_proj.bias", ("blocks", "attn", "v_bias"), (k, h)),
        ]
    if not cfg.tie_embeddings:
        specs.append(_into("lm_head.weight", ("lm_head",), (cfg.vocab_size,)))
    return specs


def _gpt2_specs(cfg: ModelConfig) -> list[Spec]:
    d, n, h = cfg.embed_dim, cfg.num_heads, cfg.head_dim
    layer = "h.{i}."

    def split_qkv(w: np.ndarray) -> tuple[np.ndarray, ...]:
        # Conv1D weight [D, 3D] (in, out) or bias [3D]: q, k, v side by side on the last axis.
        return tuple(p.reshape(*w.shape[:-1], n, h) for p in np.split(w, 3, axis=-1))

    def fuse_qkv(xs: tuple[np.ndarray, ...]) -> np.ndarray:
        lead = xs[0].shape[:-2]
        return np.concatenate([x.reshape(*lead, n * h) for x in xs], axis=-1)

    qkv = (("blocks", "attn", "q_proj"), ("blocks", "attn", "k_proj"), ("blocks", "attn", "v_proj"))
    qkv_bias = tuple(p[:-1] + (p[-1].replace("_proj", "_bias"),) for p in qkv)
    return [
        _same("wte.weight", ("embed", "embedding")),
        _same("wpe.weight", ("pos_embed",)),
        _same(layer + "ln_1.weight", ("blocks", "attn_norm", "scale")),
        _same(layer + "ln_1.bias", ("blocks", "attn_norm", "bias")),
        Spec(layer + "attn.c_attn.weight", qkv, split_qkv, fuse_qkv),
        Spec(layer + "attn.c_attn.bias", qkv_bias, split_qkv, fuse_qkv),
        Spec(
            layer + "attn.c_proj.weight",
            (("blocks", "attn", "o_proj"),),
            lambda w: (w.reshape(n, h, d),),
            lambda xs: xs[0].reshape(n * h, d),
        ),
        _same(layer + "attn.c_proj.bias", ("blocks", "attn", "o_bias")),
        _same(layer + "ln_2.weight", ("blocks", "mlp_norm", "scale")),
        _same(layer + "ln_2.bias", ("blocks", "mlp_norm", "bias")),
        _same(layer + "mlp.c_fc.weight", ("blocks", "mlp", "up_proj")),
        _same(layer + "mlp.c_fc.bias", ("blocks", "mlp", "up_bias")),
        _same(layer + "mlp.c_proj.weight", ("blocks", "mlp", "down_proj")),
        _same(layer + "mlp.c_proj.bias", ("blocks", "mlp", "down_bias")),
        _same("ln_f.weight", ("final_norm", "scale")),
        _same("ln_f.bias", ("final_norm", "bias")),
    ]


def _bloom_specs(cfg: ModelConfig) -> list[Spec]:
    d, n, h, f = cfg.embed_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    layer = "h.{i}."

    # BLOOM fuses q, k, v per head: the output rows of query_key_value are [N, 3, H].
    def split_weight(w: np.ndarray) -> tuple[np.ndarray, ...]:
        w = w.reshape(n, 3, h, d)
        return tuple(w[:, j].transpose(2, 0, 1) for j in range(3))  # each [D, N, H]

    def fuse_weight(xs: tuple[np.ndarray, ...]) -> np.ndarray:
        return np.stack([x.transpose(1, 2, 0) for x in xs], axis=1).reshape(3 * n * h, d)

    def split_bias(b: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(b.reshape(n, 3, h)[:, j] for j in range(3))

    def fuse_bias(xs: tuple[np.ndarray, ...]) -> np.ndarray:
        return np.stack(xs, axis=1).reshape(-1)

    attn = layer + "self_attention."
    qkv = tuple(("blocks", "attn", f"{x}_proj") for x in "qkv")
    qkv_bias = tuple(("blocks", "attn", f"{x}_bias") for x in "qkv")
    return [
        _same("word_embeddings.weight", ("embed", "embedding")),
        _same("word_embeddings_layernorm.weight", ("embed_norm", "scale")),
        _same("word_embeddings_layernorm.bias", ("embed_norm", "bias")),
        _same(layer + "input_layernorm.weight", ("blocks", "attn_norm", "scale")),
        _same(layer + "input_layernorm.bias", ("blocks", "attn_norm", "bias")),
        Spec(attn + "query_key_value.weight", qkv, split_weight, fuse_weight),
        Spec(attn + "query_key_value.bias", qkv_bias, split_bias, fuse_bias),
        _out_of(attn + "dense.weight", ("blocks", "attn", "o_proj"), (n, h)),
        _same(attn + "dense.bias", ("blocks", "attn", "o_bias")),
        _same(layer + "post_attention_layernorm.weight", ("blocks", "mlp_norm", "scale")),
        _same(layer + "post_attention_layernorm.bias", ("blocks", "mlp_norm", "bias")),
        _into(layer + "mlp.dense_h_to_4h.weight", ("blocks", "mlp", "up_proj"), (f,)),
        _same(layer + "mlp.dense_h_to_4h.bias", ("blocks", "mlp", "up_bias")),
        _out_of(layer + "mlp.dense_4h_to_h.weight", ("blocks", "mlp", "down_proj"), (f,)),
        _same(layer + "mlp.dense_4h_to_h.bias", ("blocks", "mlp", "down_bias")),
        _same("ln_f.weight", ("final_norm", "scale")),
        _same("ln_f.bias", ("final_norm", "bias")),
    ]


def _bert_specs(cfg: ModelConfig) -> list[Spec]:
    n, h, f = cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    layer = "encoder.layer.{i}."
    attn = layer + "attention."
    specs = [
        _same("embeddings.word_embeddings.weight", ("embed", "embedding")),
        _same("embeddings.position_embeddings.weight", ("pos_embed",)),
        _same("embeddings.LayerNorm.weight", ("embed_norm", "scale")),
        _same("embeddings.LayerNorm.bias", ("embed_norm", "bias")),
        _out_of(attn + "output.dense.weight", ("blocks", "attn", "o_proj"), (n, h)),
        _same(attn + "output.dense.bias", ("blocks", "attn", "o_bias")),
        _same(attn + "output.LayerNorm.weight", ("blocks", "attn_norm", "scale")),
        _same(attn + "output.LayerNorm.bias", ("blocks", "attn_norm", "bias")),
        _into(layer + "intermediate.dense.weight", ("blocks", "mlp", "up_proj"), (f,)),
        _same(layer + "intermediate.dense.bias", ("blocks", "mlp", "up_bias")),
        _out_of(layer + "output.dense.weight", ("blocks", "mlp", "down_proj"), (f,)),
        _same(layer + "output.dense.bias", ("blocks", "mlp", "down_bias")),
        _same(layer + "output.LayerNorm.weight", ("blocks", "mlp_norm", "scale")),
        _same(layer + "output.LayerNorm.bias", ("blocks", "mlp_norm", "bias")),
    ]
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
        specs += [
            _into(f"{attn}self.{theirs}.weight", ("blocks", "attn", f"{ours}_proj"), (n, h)),
            _reshaped(f"{attn}self.{theirs}.bias", ("blocks", "attn", f"{ours}_bias"), (n, h)),
        ]
    if cfg.type_vocab_size:
        specs.append(_same("embeddings.token_type_embeddings.weight", ("type_embed",)))
    return specs


def _t5_specs(cfg: ModelConfig) -> list[Spec]:
    n, h, f = cfg.num_heads, cfg.head_dim, cfg.mlp_dim

    def attention(prefix: str, stack: str, module: str) -> list[Spec]:
        return [
            _into(f"{prefix}.q.weight", (stack, module, "q_proj"), (n, h)),
            _into(f"{prefix}.k.weight", (stack, module, "k_proj"), (n, h)),
            _into(f"{prefix}.v.weight", (stack, module, "v_proj"), (n, h)),
            _out_of(f"{prefix}.o.weight", (stack, module, "o_proj"), (n, h)),
        ]

    def mlp(prefix: str, stack: str) -> list[Spec]:
        if cfg.gated_mlp:
            up = [
                _into(f"{prefix}.wi_0.weight", (stack, "mlp", "gate_proj"), (f,)),
                _into(f"{prefix}.wi_1.weight", (stack, "mlp", "up_proj"), (f,)),
            ]
        else:
            up = [_into(f"{prefix}.wi.weight", (stack, "mlp", "up_proj"), (f,))]
        return up + [_out_of(f"{prefix}.wo.weight", (stack, "mlp", "down_proj"), (f,))]

    enc, dec = "encoder.block.{i}.layer.", "decoder.block.{i}.layer."
    specs = [
        _same("shared.weight", ("embed", "embedding")),
        _same(enc + "0.layer_norm.weight", ("encoder", "attn_norm", "scale")),
        *attention(enc + "0.SelfAttention", "encoder", "attn"),
        _same(enc + "1.layer_norm.weight", ("encoder", "mlp_norm", "scale")),
        *mlp(enc + "1.DenseReluDense", "encoder"),
        _same(
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            ("encoder_rel_bias",),
        ),
        _same("encoder.final_layer_norm.weight", ("encoder_norm", "scale")),
        _same(dec + "0.layer_norm.weight", ("decoder", "attn_norm", "scale")),
        *attention(dec + "0.SelfAttention", "decoder", "attn"),
        _same(dec + "1.layer_norm.weight", ("decoder", "cross_norm", "scale")),
        *attention(dec + "1.EncDecAttention", "decoder", "cross_attn"),
        _same(dec + "2.layer_norm.weight", ("decoder", "mlp_norm", "scale")),
        *mlp(dec + "2.DenseReluDense", "decoder"),
        _same(
            "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            ("decoder_rel_bias",),
        ),
        _same("decoder.final_layer_norm.weight", ("decoder_norm", "scale")),
    ]
    if not cfg.tie_embeddings:
        specs.append(_into("lm_head.weight", ("lm_head",), (cfg.vocab_size,)))
    return specs


def _glm_specs(cfg: ModelConfig) -> list[Spec]:
    """GLM-4: Llama's table with a fused gate/up projection and interleaved partial RoPE.

    GLM rotates pairs (2i, 2i + 1) of the first rope_dim dims of each head; reordering those
    dims of q and k (the same way for both, so q.k is unchanged) into (i, i + rope_dim / 2)
    gives the rotate-half layout `apply_rope` uses.
    """
    n, k, h, f = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    r = cfg.rope_dim or h
    order = np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2), np.arange(r, h)])
    inverse = np.argsort(order)

    def rope_rows(name: str, path: tuple[str, ...], heads: int, bias: bool) -> Spec:
        def to_ours(w):
            w = w.reshape(heads, h, *w.shape[1:])[:, order]
            return (w.reshape(heads, h) if bias else w.reshape(heads, h, -1).transpose(2, 0, 1),)

        def to_hf(xs):
            x = xs[0] if bias else xs[0].transpose(1, 2, 0)  # [heads, H(, D)]
            return x[:, inverse].reshape(heads * h, *x.shape[2:])

        return Spec(name, (path,), to_ours, to_hf)

    layer = "model.layers.{i}."
    attn = layer + "self_attn."
    specs = [s for s in _llama_specs(cfg) if "_proj" not in s.hf_name or "o_proj" in s.hf_name]
    specs += [
        rope_rows(attn + "q_proj.weight", ("blocks", "attn", "q_proj"), n, False),
        rope_rows(attn + "k_proj.weight", ("blocks", "attn", "k_proj"), k, False),
        _into(attn + "v_proj.weight", ("blocks", "attn", "v_proj"), (k, h)),
        Spec(
            layer + "mlp.gate_up_proj.weight",
            (("blocks", "mlp", "gate_proj"), ("blocks", "mlp", "up_proj")),
            lambda w: (w[:f].T, w[f:].T),
            lambda xs: np.concatenate([xs[0].T, xs[1].T], axis=0),
        ),
        _out_of(layer + "mlp.down_proj.weight", ("blocks", "mlp", "down_proj"), (f,)),
    ]
    if cfg.qkv_bias:
        specs += [
            rope_rows(attn + "q_proj.bias", ("blocks", "attn", "q_bias"), n, True),
            rope_rows(attn + "k_proj.bias", ("blocks", "attn", "k_bias"), k, True),
            _reshaped(attn + "v_proj.bias", ("blocks", "attn", "v_bias"), (k, h)),
        ]
    return specs


_SPECS = {
    "llama": _llama_specs,
    "qwen2": _llama_specs,
    "glm": _glm_specs,
    "gpt2": _gpt2_specs,
    "bloom": _bloom_specs,
    "bert": _bert_specs,
    "t5": _t5_specs,
}

# Tensors a checkpoint may hold that no parameter takes: buffers, unused heads.
_IGNORED = {
    "llama": (r".*rotary_emb\.inv_freq", r"lm_head\.weight"),
    "qwen2": (r".*rotary_emb\.inv_freq", r"lm_head\.weight"),
    "glm": (r".*rotary_emb\.inv_freq", r"lm_head\.weight"),
    "gpt2": (r"h\.\d+\.attn\.(masked_)?bias", r"lm_head\.weight"),
    "bloom": (r"lm_head\.weight",),
    "bert": (r"embeddings\.position_ids", r"pooler\..*", r"cls\..*"),
    "t5": (r"(encoder|decoder)\.embed_tokens\.weight", r"lm_head\.weight"),
}
# Prefixes of task-model checkpoints (GPT2LMHeadModel, BertForMaskedLM) dropped on load.
_PREFIXES = {"gpt2": "transformer.", "bloom": "transformer.", "bert": "bert."}


def _normalise_names(model_type: str, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    prefix = _PREFIXES.get(model_type)
    for name, array in tensors.items():
        if prefix and name.startswith(prefix):
            name = name[len(prefix) :]
        if model_type == "bert":  # Old BERT checkpoints name LayerNorm parameters gamma/beta.
            name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
            name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
        out[name] = array
    return out


# ------------------------------------------------------------------------------------------------
# Tensors <-> model.


def model_class(model_type: str) -> type[nnx.Module]:
    from models.t5 import T5

    return {"bert": Encoder, "t5": T5}.get(model_type, Decoder)


def _get_path(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def from_hf_tensors(
    model_type: str, cfg: ModelConfig, tensors: Mapping[str, np.ndarray], source: str = ""
) -> nnx.Module:
    """Builds our model for `cfg` with weights taken from Hugging Face-named tensors.

    Args:
      model_type: one of SUPPORTED_ARCHITECTURES.
      cfg: the model config (e.g. from `config_from_hf`); its param_dtype is the storage dtype.
      tensors: name -> array, in the Hugging Face layout.
      source: where the tensors came from, for error messages.

    Raises:
      CheckpointError: naming a missing tensor, a tensor of the wrong shape (with the shape the
        config implies), or tensors that nothing takes.
    """
    where = f" in {source}" if source else ""
    tensors = _normalise_names(model_type, tensors)
    cls = model_class(model_type)
    abstract = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shapes = nnx.to_pure_dict(state)
    params: dict = {}
    used = set()
    for spec in _SPECS[model_type](cfg):
        # Per-layer tensors: as many as the stack has layers (T5's decoder may differ).
        layers = range(_get_path(shapes, spec.paths[0]).shape[0] if spec.per_layer else 1)
        names = [spec.hf_name.format(i=i) for i in layers] if spec.per_layer else [spec.hf_name]
        ours_shape = [_get_path(shapes, p).shape[1 if spec.per_layer else 0 :] for p in spec.paths]
        expected = spec.to_hf(tuple(np.empty(s, np.float32) for s in ours_shape)).shape
        per_name = []
        for name in names:
            if name not in tensors:
                raise CheckpointError(
                    f"missing tensor {name!r}{where}; the config expects shape {expected}"
                )
            array = tensors[name]
            if tuple(array.shape) != expected:
                raise CheckpointError(
                    f"tensor {name!r}{where} has shape {tuple(array.shape)}, but the config "
                    f"(embed_dim={cfg.embed_dim}, heads={cfg.num_heads}/{cfg.num_kv_heads}, "
                    f"head_dim={cfg.head_dim}, mlp_dim={cfg.mlp_dim}, vocab={cfg.vocab_size}) "
                    f"expects {expected}"
                )
            per_name.append(spec.to_ours(np.asarray(array)))
            used.add(name)
        for j, path in enumerate(spec.paths):
            parts = [p[j] for p in per_name]
            value = np.stack(parts) if spec.per_layer else parts[0]
            dtype = _get_path(shapes, path).dtype
            _set_path(params, path, jnp.asarray(value, dtype=dtype))
    ignored = [re.compile(p) for p in _IGNORED[model_type]]
    extra = sorted(n for n in tensors if n not in used and not any(p.fullmatch(n) for p in ignored))
    if extra:
        raise CheckpointError(
            f"{len(extra)} tensors{where} match no parameter of the {model_type} model as "
            f"configured, e.g. {extra[:5]}; is config.json right?"
        )
    flat_ours = {tuple(str(k.key) for k in path) for path, _ in _flatten(shapes)}
    flat_set = {tuple(str(k.key) for k in path) for path, _ in _flatten(params)}
    if flat_ours != flat_set:
        raise CheckpointError(
            f"parameters not covered by the {model_type} table: {sorted(flat_ours - flat_set)}"
        )
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _flatten(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def to_hf_tensors(model: nnx.Module, model_type: str | None = None) -> dict[str, np.ndarray]:
    """Our model's parameters as Hugging Face-named float arrays (the inverse of loading)."""
    cfg = model.cfg
    model_type = model_type or architecture_of(cfg)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    out = {}
    for spec in _SPECS[model_type](cfg):
        ours = []
        for path in spec.paths:
            try:
                ours.append(_get_path(params, path))
            except KeyError:  # e.g. GPT-2 biases of a bias-free model: zeros are the same model
                ours.append(None)
        if all(o is None for o in ours):
            ours = [np.zeros(_expected_param_shape(model, p), np.float32) for p in spec.paths]
        elif any(o is None for o in ours):
            raise CheckpointError(f"{spec.hf_name}: some of {spec.paths} are missing")
        if spec.per_layer:
            for i in range(ours[0].shape[0]):
                out[spec.hf_name.format(i=i)] = spec.to_hf(tuple(o[i] for o in ours))
        else:
            out[spec.hf_name] = spec.to_hf(tuple(ours))
    prefix = "transformer." if model_type in ("gpt2", "bloom") else ""
    return {prefix + name: np.ascontiguousarray(a) for name, a in out.items()}


def _expected_param_shape(model: nnx.Module, path: tuple[str, ...]) -> tuple[int, ...]:
    cfg = model.cfg
    n, k, h, d, f = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim, cfg.mlp_dim
    leaf = path[-1]
    shapes = {
        "q_bias": (n, h),
        "k_bias": (k, h),
        "v_bias": (k, h),
        "o_bias": (d,),
        "up_bias": (f,),
        "down_bias": (d,),
    }
    if leaf not in shapes:
        raise CheckpointError(f"parameter {'/'.join(path)} is missing from the model")
    return (cfg.num_layers, *shapes[leaf]) if path[0] == "blocks" else shapes[leaf]


# ------------------------------------------------------------------------------------------------
# Directories.


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    path = pathlib.Path(path) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path.parent} has no config.json") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint dir: model.safetensors, or the shards its index names."""
    path = pathlib.Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").exists():
        weight_map, files = None, ["model.safetensors"]
    else:
        raise CheckpointError(
            f"{path} has neither model.safetensors nor model.safetensors.index.json "
            "(PyTorch .bin checkpoints are not supported: convert them to safetensors)"
        )
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        if not (path / file).exists():
            raise CheckpointError(f"shard {file} named by {index.name} is missing from {path}")
        try:
            shard, _ = safetensors_io.read(path / file)
        except safetensors_io.SafetensorsError as e:
            raise CheckpointError(str(e)) from e
        tensors.update(shard)
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(
                f"tensors listed in {index.name} are not in the shards: {missing[:5]}"
            )
    return tensors


def load_hf_dir(path: str | os.PathLike, **overrides: Any) -> tuple[str, nnx.Module, dict]:
    """Loads a Hugging Face checkpoint dir into our model.

    Args:
      path: a dir with config.json and safetensors weights.
      **overrides: ModelConfig fields to set (dtype, param_dtype, max_seq_len, ...).

    Returns:
      (model_type, model, the parsed config.json).
    """
    hf = read_config(path)
    tensors = read_weights(path)
    model_type, cfg = config_from_hf(hf, tensors.keys(), **overrides)
    return model_type, from_hf_tensors(model_type, cfg, tensors, str(path)), hf


def save_hf_dir(
    model: nnx.Module,
    path: str | os.PathLike,
    *,
    tokenizer=None,
    max_shard_bytes: int | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Writes a decoder as a Hugging Face dir that `transformers` loads (config + safetensors).

    Args:
      model: a `Decoder` whose config matches a supported architecture (`architecture_of`).
      path: the directory to create (or overwrite files in).
      tokenizer: if it has `save_hf(dir)` (models.tokenizer.Tokenizer), its files are written
        too.
      max_shard_bytes: split the weights into shards of at most this many bytes, with the
        index file, as transformers does for big models.
      extra_config: more config.json keys (e.g. bos_token_id, eos_token_id).
    """
    cfg = model.cfg
    model_type = architecture_of(cfg)
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_tensors(model, model_type)
    if max_shard_bytes is None:
        safetensors_io.write(path / "model.safetensors", tensors)
    else:
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        for name in sorted(tensors):
            if shards[-1] and size + tensors[name].nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensors[name]
            size += tensors[name].nbytes
        weight_map = {}
        for j, shard in enumerate(shards):
            file = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
            safetensors_io.write(path / file, shard)
            weight_map.update({name: file for name in shard})
        total = sum(a.nbytes for a in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf = config_to_hf(cfg, model_type)
    hf.update(extra_config or {})
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if tokenizer is not None and hasattr(tokenizer, "save_hf"):
        tokenizer.save_hf(path)
    return path
