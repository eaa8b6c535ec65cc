"""Hugging Face checkpoints: our logits equal transformers' on golden fixtures; export; errors.

The fixtures under tests/fixtures/golden/ are tiny random-weight checkpoints that
tests/fixtures/make_golden.py wrote with transformers, with transformers' outputs beside them.
"""

import json
import os
import pathlib
import shutil
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import Decoder, ModelConfig, hf, safetensors_io

GOLDEN = pathlib.Path(__file__).parents[1] / "fixtures" / "golden"


def max_relative_error(ours: np.ndarray, reference: np.ndarray, mask=None) -> float:
    """max |ours - ref| / max |ref| over the compared entries."""
    diff = np.abs(np.asarray(ours, np.float64) - reference)
    if mask is not None:
        diff, reference = diff[mask.astype(bool)], reference[mask.astype(bool)]
    return float(diff.max() / np.abs(reference).max())


@pytest.mark.parametrize("name", ["llama", "llama_tied", "qwen2", "glm", "gpt2", "bloom"])
def test_decoder_logits_match_transformers(name):
    model_type, model, _ = hf.load_hf_dir(GOLDEN / name)
    reference = np.load(GOLDEN / name / "reference.npz")
    assert model_type == name.split("_")[0]
    if name == "glm":
        assert model.cfg.rope_dim == model.cfg.head_dim // 2 and model.cfg.qkv_bias
    logits = model(jnp.asarray(reference["input_ids"]))
    assert logits.shape == reference["logits"].shape
    assert max_relative_error(logits, reference["logits"]) <= 1e-4


def test_bert_hidden_states_match_transformers():
    model_type, model, _ = hf.load_hf_dir(GOLDEN / "bert")
    reference = np.load(GOLDEN / "bert" / "reference.npz")
    mask = reference["attention_mask"]
    hidden = model(
        jnp.asarray(reference["input_ids"]),
        jnp.asarray(mask),
        jnp.asarray(reference["token_type_ids"]),
    )
    assert model_type == "bert" and not model.cfg.causal
    assert not mask.all()  # the fixture pads one row, so padding is exercised
    # Padded positions' states are not meaningful (transformers computes them differently).
    assert max_relative_error(hidden, reference["last_hidden_state"], mask) <= 1e-4


def test_sharded_index_is_followed():
    assert (GOLDEN / "llama" / "model.safetensors.index.json").exists()
    tensors = hf.read_weights(GOLDEN / "llama")
    index = json.loads((GOLDEN / "llama" / "model.safetensors.index.json").read_text())
    assert set(tensors) == set(index["weight_map"])


def _tiny(**kw) -> ModelConfig:
    base = dict(
        vocab_size=96,
        num_layers=2,
        embed_dim=32,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=48,
        max_seq_len=32,
    )
    return ModelConfig(**{**base, **kw})


GPT2_STYLE = dict(
    norm="layernorm",
    mlp_activation="gelu",
    position="learned",
    qkv_bias=True,
    out_bias=True,
    tie_embeddings=True,
    num_kv_heads=4,
)


BLOOM_STYLE = {**GPT2_STYLE, "position": "alibi", "embed_norm": True, "mlp_dim": 128}


@pytest.mark.parametrize(
    "kw, arch",
    [
        (dict(), "llama"),
        (dict(qkv_bias=True, tie_embeddings=True), "qwen2"),
        (GPT2_STYLE, "gpt2"),
        (BLOOM_STYLE, "bloom"),
    ],
)
def test_export_round_trip_gives_identical_logits(tmp_path, kw, arch):
    model = Decoder(_tiny(**kw), rngs=nnx.Rngs(3))
    hf.save_hf_dir(model, tmp_path, max_shard_bytes=16_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == arch
    model_type, loaded, _ = hf.load_hf_dir(tmp_path)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 9)))
    assert model_type == arch
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(loaded(tokens)))


def test_bias_free_gpt2_style_model_exports_with_zero_biases(tmp_path):
    kw = {**GPT2_STYLE, "qkv_bias": False, "out_bias": False}
    model = Decoder(_tiny(**kw), rngs=nnx.Rngs(0))
    hf.save_hf_dir(model, tmp_path)
    tensors, _ = safetensors_io.read(tmp_path / "model.safetensors")
    assert not tensors["transformer.h.0.attn.c_attn.bias"].any()
    _, loaded, _ = hf.load_hf_dir(tmp_path)
    tokens = jnp.arange(8)[None]
    np.testing.assert_allclose(model(tokens), loaded(tokens), atol=1e-6)


def test_unexportable_config_is_named():
    with pytest.raises(hf.CheckpointError, match="matches no Hugging Face decoder"):
        hf.architecture_of(_tiny(norm="layernorm"))


def test_safetensors_writer_is_read_by_the_safetensors_package(tmp_path):
    from safetensors.numpy import load_file

    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float16)}
    safetensors_io.write(tmp_path / "x.safetensors", arrays)
    loaded = load_file(str(tmp_path / "x.safetensors"))
    for name, array in arrays.items():
        np.testing.assert_array_equal(loaded[name], array)


# ------------------------------------------------------------------------------------------------
# Bad checkpoints.


@pytest.fixture
def llama_copy(tmp_path):
    target = tmp_path / "llama"
    shutil.copytree(GOLDEN / "llama_tied", target)
    return target


def test_wrong_shape_names_tensor_and_expected_shape(llama_copy):
    tensors, _ = safetensors_io.read(llama_copy / "model.safetensors")
    tensors = dict(tensors)
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = np.zeros((tensors[name].shape[0] + 4, tensors[name].shape[1]), np.float32)
    safetensors_io.write(llama_copy / "model.safetensors", tensors)
    with pytest.raises(
        hf.CheckpointError, match=r"k_proj\.weight.*has shape \(20, 48\).*expects \(16, 48\)"
    ):
        hf.load_hf_dir(llama_copy)


def test_missing_tensor_is_named(llama_copy):
    tensors = dict(safetensors_io.read(llama_copy / "model.safetensors")[0])
    del tensors["model.layers.0.mlp.up_proj.weight"]
    safetensors_io.write(llama_copy / "model.safetensors", tensors)
    with pytest.raises(hf.CheckpointError, match=r"missing tensor 'model\.layers\.0\.mlp\.up_proj"):
        hf.load_hf_dir(llama_copy)


def test_unexpected_tensor_is_named(llama_copy):
    tensors = dict(safetensors_io.read(llama_copy / "model.safetensors")[0])
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(48, np.float32)
    safetensors_io.write(llama_copy / "model.safetensors", tensors)
    with pytest.raises(hf.CheckpointError, match="q_proj.bias"):
        hf.load_hf_dir(llama_copy)


def test_truncated_safetensors_is_named(llama_copy):
    path = llama_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(hf.CheckpointError, match="truncated"):
        hf.load_hf_dir(llama_copy)


def test_unknown_architecture_and_features(llama_copy):
    with pytest.raises(hf.CheckpointError, match="unsupported architecture model_type='mamba'"):
        hf.config_from_hf({"model_type": "mamba"})
    config = json.loads((llama_copy / "config.json").read_text())
    with pytest.raises(hf.CheckpointError, match="RoPE scaling"):
        hf.config_from_hf({**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    (llama_copy / "config.json").unlink()
    with pytest.raises(hf.CheckpointError, match="no config.json"):
        hf.load_hf_dir(llama_copy)


def test_gguf_logits_match_transformers_on_the_same_tensors():
    from models import load_pretrained

    lm = load_pretrained(GOLDEN / "llama_gguf" / "model.gguf")
    reference = np.load(GOLDEN / "llama_gguf" / "reference.npz")
    logits = lm.model(jnp.asarray(reference["input_ids"]))
    assert max_relative_error(logits, reference["logits"]) <= 1e-4
    types = {t.ggml_type for t in lm.gguf_file.tensors.values()}
    assert {"F16", "Q8_0", "F32"} <= types


PEER_PYTHON = os.environ.get("JAXLM_PEER_PYTHON")


@pytest.mark.skipif(not PEER_PYTHON, reason="set JAXLM_PEER_PYTHON to a python with transformers")
@pytest.mark.parametrize(
    "kw", [dict(), dict(qkv_bias=True, tie_embeddings=True), GPT2_STYLE, BLOOM_STYLE]
)
def test_transformers_loads_our_export_to_the_same_logits(tmp_path, kw):
    model = Decoder(_tiny(**{**kw, "init_std": 0.2}), rngs=nnx.Rngs(5))
    hf.save_hf_dir(model, tmp_path / "export")
    tokens = np.random.default_rng(1).integers(0, 96, (2, 11)).astype(np.int32)
    np.savez(tmp_path / "ours.npz", input_ids=tokens, logits=np.asarray(model(jnp.asarray(tokens))))
    script = GOLDEN.parent / "make_golden.py"
    result = subprocess.run(
        [
            PEER_PYTHON,
            str(script),
            "check-export",
            str(tmp_path / "export"),
            "--expect",
            str(tmp_path / "ours.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", ["t5", "t5_tied"])
def test_t5_matches_transformers_and_caches(name):
    from models.t5 import T5

    model_type, model, _ = hf.load_hf_dir(GOLDEN / name)
    reference = np.load(GOLDEN / name / "reference.npz")
    assert model_type == "t5" and isinstance(model, T5)
    ids, mask = jnp.asarray(reference["input_ids"]), jnp.asarray(reference["attention_mask"])
    decoder_ids = jnp.asarray(reference["decoder_input_ids"])
    assert not reference["attention_mask"].all()  # encoder padding is exercised
    encoded = model.encode(ids, mask)
    assert (
        max_relative_error(
            encoded, reference["encoder_last_hidden_state"], reference["attention_mask"]
        )
        <= 1e-4
    )
    logits = model(ids, decoder_ids, mask)
    assert max_relative_error(logits, reference["logits"]) <= 1e-4

    # Decoding one token at a time with the self-attention cache equals the full decoder.
    cache = model.init_cache(2, 8)
    steps = []
    for t in range(decoder_ids.shape[1]):
        step, cache = model.decode(decoder_ids[:, t : t + 1], encoded, mask, cache=cache)
        steps.append(step)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), logits, rtol=1e-5, atol=1e-5)
