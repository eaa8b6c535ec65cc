"""Weight-only quantization: error bounds, frozen storage, config dispatch, Pallas == XLA, GGUF."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import build_model, gguf, hf
from models.config import ModelConfig
from models.decoder import Decoder
from models.quantize import (
    QuantData,
    QuantizedDense,
    group_size_for,
    load_gguf_blocks,
    model_bytes,
    quantize,
)

pytestmark = pytest.mark.usefixtures("jax_compile_cache")

GOLDEN = pathlib.Path(__file__).parents[1] / "fixtures" / "golden"
# embed 64 so that int4 groups of 32 and 64 both divide every input dim; 16 | N for Pallas.
CFG = ModelConfig(
    vocab_size=64, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, mlp_dim=128,
    max_seq_len=16, init_std=0.05,
)  # fmt: skip
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)


@nnx.jit
def forward(model, tokens):
    return model(tokens)


@pytest.fixture(scope="module")
def base_model():
    return Decoder(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def base_logits(base_model):
    return np.asarray(forward(nnx.clone(base_model), TOKENS))


def relative(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize(
    "mode, group, max_logit_error", [("int8", None, 0.02), ("int8", 32, 0.02), ("int4", 32, 0.15)]
)
def test_error_bounds_and_storage(base_model, base_logits, mode, group, max_logit_error):
    floats = nnx.to_pure_dict(nnx.state(nnx.clone(base_model), nnx.Param))
    model = quantize(nnx.clone(base_model), mode, group)
    assert model.cfg.quant == mode and model.blocks.attn.cfg.quant == mode
    for owner, name in [("attn", "q_proj"), ("attn", "o_proj"), ("mlp", "down_proj")]:
        q = getattr(getattr(model.blocks, owner), name)
        assert isinstance(q, QuantizedDense) and q.bits == (8 if mode == "int8" else 4)
        w = np.asarray(floats["blocks"][owner][name])
        k = int(np.prod(q.shape[: q.num_contract]))
        error = np.abs(np.asarray(q.dequantize()) - w).reshape(2, k, -1)  # [L, K, N]
        # Round to nearest: every weight within half a step of its group's scale.
        scales = np.repeat(np.asarray(q.scales[...]), q.group_size, axis=1)  # [L, K, N]
        assert scales.shape == error.shape
        assert np.all(error <= 0.5 * scales * (1 + 1e-5) + 1e-7)
    # Quantized arrays are frozen: not nnx.Param; the float projections are gone.
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert "attn" not in params["blocks"] and "mlp" not in params["blocks"]  # only norms left
    assert len(jax.tree.leaves(nnx.state(model, QuantData))) == 7 * (2 if mode == "int8" else 3)
    assert model_bytes(model) < 0.5 * model_bytes(nnx.clone(base_model))
    assert relative(forward(model, TOKENS), base_logits) < max_logit_error


def test_group_size_choice_and_errors():
    assert group_size_for(576, "int4", 128) == 64  # SmolLM2's embed dim
    assert group_size_for(1536, "int4", 128) == 128
    assert group_size_for(576, "int8", None) == 576  # per channel
    with pytest.raises(ValueError, match="int4 needs a group_size"):
        group_size_for(576, "int4", None)
    with pytest.raises(ValueError, match="group_size=100"):
        group_size_for(576, "int4", 100)
    with pytest.raises(ValueError, match="not one of"):
        quantize(Decoder(CFG, rngs=nnx.Rngs(0)), "int3")


def test_config_validates_and_build_model_quantizes():
    with pytest.raises(ValueError, match="quant='fp8'"):
        CFG.replace(quant="fp8")
    with pytest.raises(ValueError, match="quant_group_size"):
        CFG.replace(quant="int4", quant_group_size=256)
    model = build_model(CFG.replace(quant="int4", quant_group_size=64), 0)
    assert isinstance(model.blocks.mlp.down_proj, QuantizedDense)
    assert model.blocks.mlp.down_proj.group_size == 64 and model.blocks.attn.q_proj.impl == "xla"


def test_pallas_int8_model_matches_xla_fp32(base_model, base_logits):
    """attention_impl='pallas' runs flash attention and the quantized-matmul kernel."""
    model = nnx.clone(base_model)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and hasattr(node, "cfg"):
            node.cfg = node.cfg.replace(attention_impl="pallas")
    quantize(model, "int8", None)
    assert model.blocks.attn.q_proj.impl == "pallas"
    pallas = forward(model, TOKENS)
    xla = forward(quantize(nnx.clone(base_model), "int8", None), TOKENS)
    assert relative(pallas, xla) < 1e-4  # the same quantized model, two implementations
    assert relative(pallas, base_logits) < 0.02  # and within int8's error of the float model


def _q8_0(values: np.ndarray) -> np.ndarray:
    """A float [out, in] matrix as GGUF Q8_0 blocks: per 32 values an f16 scale and 32 int8."""
    blocks = values.reshape(values.shape[0], -1, 32)
    d = (np.abs(blocks).max(-1, keepdims=True) / 127).astype(np.float16)
    q = np.round(blocks / np.where(d == 0, 1, d).astype(np.float32)).astype(np.int8)
    return np.concatenate([d.view(np.uint8), q.view(np.uint8)], axis=-1).reshape(-1)


def test_gguf_blocks_load_straight_into_the_model():
    """Every projection of the golden llama GGUF as Q8_0 (q/k rows in llama.cpp's order)."""
    file = gguf.read_gguf(GOLDEN / "llama_gguf" / "model.gguf")
    tensors = dict(file.tensors)
    for name, t in file.tensors.items():
        if name.startswith("blk.") and t.ggml_type == "F16" and len(t.shape) == 2:
            raw = _q8_0(t.dequantize(np.float32))
            tensors[name] = dataclasses.replace(t, ggml_type="Q8_0", raw=raw)
    file = dataclasses.replace(file, tensors=tensors)
    model_type, cfg = hf.config_from_hf(gguf.hf_config_from_gguf(file))
    floats = hf.from_hf_tensors(model_type, cfg, gguf.hf_state_dict_from_gguf(file))
    expected = np.asarray(forward(floats, TOKENS % cfg.vocab_size))
    model = hf.from_hf_tensors(model_type, cfg, gguf.hf_state_dict_from_gguf(file))
    load_gguf_blocks(model, file)
    q = model.blocks.attn.q_proj
    assert isinstance(q, QuantizedDense) and (q.bits, q.group_size) == (8, 32)
    # Same weights exactly (the blocks are the float model's source), so the same logits.
    np.testing.assert_allclose(q.dequantize(), floats.blocks.attn.q_proj[...], rtol=0, atol=1e-6)
    assert relative(forward(model, TOKENS % cfg.vocab_size), expected) < 1e-5
