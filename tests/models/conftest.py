"""Tiny GPT-2- and Llama-style models shared by the model tests, built and jitted once per session."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable

import jax
import pytest
from flax import nnx

from models.config import ModelConfig
from models.decoder import Decoder

# vocab 64, 2 layers, embed 32, 4 heads: compiles in well under a second on CPU. A larger
# init_std than the default 0.02 keeps logits far enough from zero that a leak between
# positions or sequences shows up well above float32 rounding.
TINY = dict(
    vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, mlp_dim=64, max_seq_len=32, init_std=0.2
)


def gpt2_tiny(**changes) -> ModelConfig:
    """Learned positions, LayerNorm, GELU, biases, tied head."""
    return ModelConfig(
        **{
            **TINY,
            "norm": "layernorm",
            "mlp_activation": "gelu",
            "position": "learned",
            "qkv_bias": True,
            "out_bias": True,
            "tie_embeddings": True,
            **changes,
        }
    )


def llama_tiny(num_kv_heads: int = 2, **changes) -> ModelConfig:
    """RoPE, RMSNorm, SwiGLU, grouped KV heads, untied head."""
    return ModelConfig(
        **{
            **TINY,
            "norm": "rmsnorm",
            "mlp_activation": "swiglu",
            "position": "rope",
            "num_kv_heads": num_kv_heads,
            **changes,
        }
    )


def bloom_tiny(**changes) -> ModelConfig:
    """ALiBi (no position table), embedding LayerNorm, GELU, biases, tied head."""
    return gpt2_tiny(**{"position": "alibi", "embed_norm": True, "num_heads": 8, **changes})


FAMILIES = {
    "gpt2": gpt2_tiny,
    "bloom": bloom_tiny,
    "llama_gqa": lambda: llama_tiny(num_kv_heads=2),
    "llama_mqa": lambda: llama_tiny(num_kv_heads=1),
}


@dataclasses.dataclass
class TinyModel:
    name: str
    cfg: ModelConfig
    model: Decoder
    graphdef: nnx.GraphDef
    state: nnx.State
    forward: Callable  # (tokens, positions=None, segment_ids=None) -> logits, jitted


def build_tiny(name: str, cfg: ModelConfig, seed: int = 0) -> TinyModel:
    model = Decoder(cfg, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)

    @jax.jit
    def jitted(state, tokens, positions, segment_ids):
        return nnx.merge(graphdef, state)(tokens, positions=positions, segment_ids=segment_ids)

    def forward(tokens, positions=None, segment_ids=None):
        return jitted(state, tokens, positions, segment_ids)

    return TinyModel(name, cfg, model, graphdef, state, forward)


@pytest.fixture(scope="session")
def tiny_models() -> Callable[[str], TinyModel]:
    """tiny_models(name) builds (once per session) the family `name` of FAMILIES."""
    cache: dict[str, TinyModel] = {}

    def get(name: str) -> TinyModel:
        if name not in cache:
            cache[name] = build_tiny(name, FAMILIES[name]())
        return cache[name]

    return get


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def tiny_model(request, tiny_models) -> TinyModel:
    """Each family in turn: GPT-2, BLOOM (ALiBi), Llama with GQA (K=2) and with MQA (K=1)."""
    return tiny_models(request.param)


@pytest.fixture(scope="session")
def tiny():
    """The config builders for tests that need a specific variant: tiny.gpt2(), tiny.llama(K)."""
    return types.SimpleNamespace(gpt2=gpt2_tiny, llama=llama_tiny)
