"""The typed, frozen model config every model and loader receives, and named presets.

A `ModelConfig` is built once at the boundary (from an experiment's ConfigDict or a checkpoint's
config.json) and validated there, so that a bad shape fails before anything is compiled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import jax.numpy as jnp

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("xla", "pallas", "cudnn", "auto")
QUANT_MODES = ("none", "int8", "int4")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a transformer: decoders (GPT-2, Llama families) and BERT encoders.

    Attributes:
      architecture: "decoder" (GPT-2, Llama, BLOOM: models.Decoder), "encoder" (BERT:
        models.Encoder) or "encoder_decoder" (T5: models.t5.T5); `models.build_model` picks
        the class.
      vocab_size: number of token ids (V).
      num_layers: number of transformer blocks (L), scanned.
      embed_dim: residual width (D).
      num_heads: query heads (N).
      num_kv_heads: key/value heads (K); N % K == 0. K == N is MHA, K == 1 is MQA.
      head_dim: per-head width (H); defaults to embed_dim // num_heads.
      mlp_dim: hidden width of the MLP (F).
      max_seq_len: longest sequence (learned positions table size, KV cache default).
      norm: "layernorm" (GPT-2) or "rmsnorm" (Llama).
      norm_eps: epsilon inside the norm.
      mlp_activation: "gelu" (tanh approximation, GPT-2), "gelu_exact" (erf, BERT),
        "quick_gelu" (x * sigmoid(1.702 x), OpenAI CLIP), "relu" (T5 v1.0), or gated:
        "swiglu" (Llama), "geglu" (tanh-GELU gate, T5 v1.1 / Flan-T5).
      position: "learned" (absolute table, GPT-2), "rope" (Llama), "alibi" (a per-head linear
        distance penalty on the attention scores, Press et al. 2022; BLOOM) or "relative"
        (T5's learned bias per bucket of relative distance, shared by all layers of a stack).
      relative_buckets / relative_max_distance: T5's bucketing of relative distances.
      scale_attention: divide attention scores by sqrt(head_dim); T5 folds that into its init.
      num_decoder_layers: decoder depth of an encoder-decoder model (None: num_layers).
      head_input_scale: multiplies the final hidden state before the LM head (T5 v1.0 and
        transformers' T5 saves: embed_dim ** -0.5; everything else 1).
      rope_theta: RoPE base frequency.
      rope_dim: how many leading dims of each head RoPE rotates (GLM-4 rotates half); None: all.
      qkv_bias: bias on the q/k/v projections (GPT-2, Qwen 2).
      out_bias: bias on the attention output projection and the MLP (GPT-2).
      tie_embeddings: the LM head reuses the token embedding matrix.
      norm_placement: "pre" (x + f(norm(x)), GPT-2 and Llama) or "post" (norm(x + f(x)),
        BERT; there is then no final norm).
      causal: attention sees only earlier positions (decoders) or every position (encoders).
      type_vocab_size: rows of the token-type (segment A/B) embedding, 0 for none (BERT: 2).
      embed_norm: a norm right after the embeddings (BERT, BLOOM).
      block_positions: a second learned position table for the position inside a generated
        span (GLM's 2D positions; the first table holds the position in the context).
      dropout_rate: dropout on embeddings, attention output and MLP output in training.
      dtype: compute dtype ("float32" or "bfloat16").
      param_dtype: parameter storage dtype.
      remat_policy: rematerialisation of each block in the backward pass, one of
        REMAT_POLICIES ("none" keeps all activations, "full" recomputes the block,
        "dots" saves matmul outputs, "dots_no_batch" saves weight matmuls only).
      scan_unroll: layers per iteration of the layer scan. 1 keeps compile time flat in depth;
        num_layers unrolls fully, which runs small models markedly faster on CPU (XLA:CPU
        differentiates a rolled loop over stacked weights poorly) at the cost of compile time.
      attention_impl: the attention of training and prefill (no cache): "xla" (plain
        einsums, every backend), "pallas" (kernels/flash_attention.py: Triton on GPU, interpret
        mode on CPU), "cudnn" (jax.nn.dot_product_attention's cuDNN flash attention, GPU) or
        "auto" (pallas on GPU where it applies, else xla). The Pallas and cuDNN paths order
        causality by token index, as training and prefill always do, and take no score bias:
        ALiBi, T5 and prefix-LM attention always use xla.
      init_std: standard deviation of the normal initialiser for weights.
      quant: weight-only quantization of the linear projections (models/quantize.py): "none",
        "int8" or "int4"; applied by `models.build_model` and `load_pretrained(quant=...)`.
        The matmul dequantizes in plain JAX, or runs kernels/quant_matmul.py's Pallas kernel
        when attention_impl resolves to "pallas" (Triton on GPU, Mosaic on TPU).
      quant_group_size: input rows per scale (int8: 0 = one scale per output channel; int4:
        32, 64 or 128). A group that does not divide a weight's input dim falls back to the
        largest allowed one that does.
    """

    vocab_size: int
    num_layers: int
    embed_dim: int
    num_heads: int
    mlp_dim: int
    max_seq_len: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    mlp_activation: Literal["gelu", "gelu_exact", "quick_gelu", "relu", "swiglu", "geglu"] = (
        "swiglu"
    )
    position: Literal["learned", "rope", "alibi", "relative"] = "rope"
    rope_theta: float = 10000.0
    rope_dim: int | None = None
    relative_buckets: int = 32
    relative_max_distance: int = 128
    scale_attention: bool = True
    num_decoder_layers: int | None = None
    head_input_scale: float = 1.0
    qkv_bias: bool = False
    out_bias: bool = False
    tie_embeddings: bool = False
    norm_placement: Literal["pre", "post"] = "pre"
    causal: bool = True
    type_vocab_size: int = 0
    embed_norm: bool = False
    block_positions: bool = False
    dropout_rate: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    scan_unroll: int = 1
    attention_impl: str = "xla"
    init_std: float = 0.02
    quant: str = "none"
    quant_group_size: int = 128
    architecture: Literal["decoder", "encoder", "encoder_decoder"] = "decoder"

    def __post_init__(self):
        # Fill derived defaults on a frozen dataclass.
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.embed_dim % self.num_heads:
                raise ValueError(
                    f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}; "
                    "set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.embed_dim // self.num_heads)
        self.validate()

    def validate(self) -> None:
        positive = ("vocab_size", "num_layers", "embed_dim", "num_heads", "mlp_dim", "max_seq_len")
        for name in positive + ("num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got head_dim={self.head_dim}")
        if self.rope_dim is not None and (
            self.rope_dim % 2 or not 0 < self.rope_dim <= self.head_dim
        ):
            raise ValueError(
                f"rope_dim={self.rope_dim} must be even and in (0, head_dim={self.head_dim}]"
            )
        choices = {
            "norm": ("layernorm", "rmsnorm"),
            "mlp_activation": ("gelu", "gelu_exact", "quick_gelu", "relu", "swiglu", "geglu"),
            "norm_placement": ("pre", "post"),
            "architecture": ("decoder", "encoder", "encoder_decoder"),
            "position": ("learned", "rope", "alibi", "relative"),
            "remat_policy": REMAT_POLICIES,
            "attention_impl": ATTENTION_IMPLS,
            "dtype": ("float32", "bfloat16", "float16"),
            "param_dtype": ("float32", "bfloat16", "float16"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        if not 1 <= self.scan_unroll <= self.num_layers:
            raise ValueError(
                f"scan_unroll={self.scan_unroll} must be between 1 and num_layers={self.num_layers}"
            )
        if self.block_positions and self.position != "learned":
            raise ValueError("block_positions (GLM's 2D positions) needs position='learned'")
        if self.attention_impl in ("pallas", "cudnn") and self.position in ("alibi", "relative"):
            raise ValueError(
                f"attention_impl={self.attention_impl!r} takes no score bias, which "
                f"position={self.position!r} needs; use 'xla' or 'auto'"
            )
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            raise ValueError(f"type_vocab_size must be >= 0, got {self.type_vocab_size!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.quant not in QUANT_MODES:
            raise ValueError(f"quant={self.quant!r} is not one of {QUANT_MODES}")
        groups = {"int4": (32, 64, 128), "int8": (0, 16, 32, 64, 128, 256, 512, 1024)}
        if self.quant in groups and self.quant_group_size not in groups[self.quant]:
            raise ValueError(
                f"quant={self.quant!r} takes quant_group_size in {groups[self.quant]}, got "
                f"{self.quant_group_size}"
            )

    @property
    def gated_mlp(self) -> bool:
        return self.mlp_activation in ("swiglu", "geglu")

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Builds a config from a mapping (e.g. an experiment's `config.model`), naming unknown keys."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(
                f"unknown model config keys {unknown}; valid keys are {sorted(fields)}"
            )
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ----------------------------------------------------------------------------------------
    # Counting, for MFU and for the README.

    def num_params(self, include_embeddings: bool = True) -> int:
        d, f, h = self.embed_dim, self.mlp_dim, self.head_dim
        n, k = self.num_heads, self.num_kv_heads
        attn = d * n * h + 2 * d * k * h + n * h * d
        if self.qkv_bias:
            attn += (n + 2 * k) * h
        if self.out_bias:
            attn += d
        mlp = (3 if self.gated_mlp else 2) * d * f
        if self.out_bias:
            mlp += f + d
        norm_size = d * (2 if self.norm == "layernorm" else 1)
        total = self.num_layers * (attn + mlp + 2 * norm_size)
        if self.norm_placement == "pre":
            total += norm_size  # final norm
        if include_embeddings:
            total += self.type_vocab_size * d + (norm_size if self.embed_norm else 0)
            total += self.vocab_size * d
            if not self.tie_embeddings:
                total += self.vocab_size * d
            if self.position == "learned":
                total += self.max_seq_len * d * (2 if self.block_positions else 1)
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per matmul weight plus 12 * L * N * H * T for attention.

        The PaLM (Chowdhery et al. 2022, appendix B) convention behind MFU numbers: forward and
        backward are 3x a forward pass, the LM head counts, embedding lookups and the causal
        mask's skipped half do not.
        """
        matmul_params = self.num_params(include_embeddings=False) + self.vocab_size * self.embed_dim
        attention = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len
        return 6.0 * matmul_params + attention


# ------------------------------------------------------------------------------------------------
# Presets: one entry per published model shape. Full-size shapes are checked with jax.eval_shape.


def gpt2(size: str = "124m") -> ModelConfig:
    """GPT-2 (Radford et al. 2019): learned positions, LayerNorm, GELU, biases, tied head."""
    shapes = {
        "124m": (12, 768, 12),
        "355m": (24, 1024, 16),
        "774m": (36, 1280, 20),
        "1.5b": (48, 1600, 25),
    }
    if size not in shapes:
        raise ValueError(f"unknown GPT-2 size {size!r}; choose from {sorted(shapes)}")
    layers, dim, heads = shapes[size]
    return ModelConfig(
        vocab_size=50257,
        num_layers=layers,
        embed_dim=dim,
        num_heads=heads,
        mlp_dim=4 * dim,
        max_seq_len=1024,
        norm="layernorm",
        norm_eps=1e-5,
        mlp_activation="gelu",
        position="learned",
        qkv_bias=True,
        out_bias=True,
        tie_embeddings=True,
    )


def smollm2_135m() -> ModelConfig:
    """SmolLM2-135M (HuggingFaceTB): Llama architecture, GQA 9/3, tied embeddings."""
    return ModelConfig(
        vocab_size=49152,
        num_layers=30,
        embed_dim=576,
        num_heads=9,
        num_kv_heads=3,
        mlp_dim=1536,
        max_seq_len=8192,
        norm="rmsnorm",
        norm_eps=1e-5,
        mlp_activation="swiglu",
        position="rope",
        rope_theta=100000.0,
        tie_embeddings=True,
    )


def llama3_8b() -> ModelConfig:
    """Llama 3 8B (Meta): GQA 32/8, RoPE base 500000, 128k vocabulary."""
    return ModelConfig(
        vocab_size=128256,
        num_layers=32,
        embed_dim=4096,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=14336,
        max_seq_len=8192,
        norm="rmsnorm",
        norm_eps=1e-5,
        mlp_activation="swiglu",
        position="rope",
        rope_theta=500000.0,
    )


def llama3_2_1b() -> ModelConfig:
    """Llama 3.2 1B (Meta): GQA 32/8 with head_dim 64, tied embeddings, 128k vocabulary.

    The RoPE frequency scaling of Llama 3.1+ long context is not modelled (same shapes).
    """
    return ModelConfig(
        vocab_size=128256,
        num_layers=16,
        embed_dim=2048,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=8192,
        max_seq_len=8192,
        norm="rmsnorm",
        norm_eps=1e-5,
        mlp_activation="swiglu",
        position="rope",
        rope_theta=500000.0,
        tie_embeddings=True,
    )


def qwen2_0_5b() -> ModelConfig:
    """Qwen2-0.5B (Alibaba): Llama-like with q/k/v biases, GQA 14/2, tied embeddings."""
    return ModelConfig(
        vocab_size=151936,
        num_layers=24,
        embed_dim=896,
        num_heads=14,
        num_kv_heads=2,
        mlp_dim=4864,
        max_seq_len=32768,
        norm="rmsnorm",
        norm_eps=1e-6,
        mlp_activation="swiglu",
        position="rope",
        rope_theta=1000000.0,
        qkv_bias=True,
        tie_embeddings=True,
    )


PRESETS = {
    "gpt2-124m": lambda: gpt2("124m"),
    "gpt2-355m": lambda: gpt2("355m"),
    "gpt2-774m": lambda: gpt2("774m"),
    "gpt2-1.5b": lambda: gpt2("1.5b"),
    "smollm2-135m": smollm2_135m,
    "llama3-8b": llama3_8b,
    "llama3.2-1b": llama3_2_1b,
    "qwen2-0.5b": qwen2_0_5b,
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Returns a named preset, optionally with fields replaced (e.g. `dtype="bfloat16"`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]().replace(**overrides)
