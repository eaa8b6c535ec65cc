"""CLIP: parity with transformers on a golden fixture, patch embedding shapes, text pooling,
and the loader's errors.

tests/fixtures/golden/clip/ is a tiny random-weight CLIPModel written by
tests/fixtures/make_clip_golden.py, with transformers' outputs beside it.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import hf, safetensors_io
from models.clip import CLIP, CLIPConfig, patchify, tower_config
from models.clip_hf import clip_config_from_hf, load_clip_dir

GOLDEN = pathlib.Path(__file__).parents[1] / "fixtures" / "golden" / "clip"

pytestmark = pytest.mark.usefixtures("jax_compile_cache")


def max_relative_error(ours, reference) -> float:
    diff = np.abs(np.asarray(ours, np.float64) - reference)
    return float(diff.max() / np.abs(reference).max())


@pytest.fixture(scope="module")
def golden():
    model, _ = load_clip_dir(GOLDEN)
    reference = dict(np.load(GOLDEN / "reference.npz"))
    images = jnp.asarray(reference["pixel_values"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    tokens, mask = jnp.asarray(reference["input_ids"]), jnp.asarray(reference["attention_mask"])
    return model, reference, images, tokens, mask


def test_config_is_read_from_config_json(golden):
    model = golden[0]
    cfg = model.cfg
    assert (cfg.vision.num_layers, cfg.vision.embed_dim, cfg.vision.num_heads) == (3, 16, 2)
    assert (cfg.text.num_layers, cfg.text.embed_dim, cfg.text.num_heads) == (2, 24, 3)
    assert cfg.text.mlp_activation == "quick_gelu" and cfg.text.causal and not cfg.vision.causal
    assert (cfg.image_size, cfg.patch_size, cfg.projection_dim, cfg.eos_token_id) == (12, 4, 8, 63)
    assert float(model.logit.scale[...]) == pytest.approx(np.log(1 / 0.07), abs=1e-4)


def test_embeddings_and_logits_match_transformers(golden):
    model, reference, images, tokens, mask = golden
    assert not reference["attention_mask"].all()  # padded texts of several lengths
    assert max_relative_error(model.vision(images), reference["image_features"]) <= 1e-4
    assert max_relative_error(model.text(tokens, mask), reference["text_features"]) <= 1e-4
    image_embeds, text_embeds = model(images, tokens, mask)
    assert max_relative_error(image_embeds, reference["image_embeds"]) <= 1e-4
    assert max_relative_error(text_embeds, reference["text_embeds"]) <= 1e-4
    logits = model.logits(image_embeds, text_embeds)
    assert logits.shape == (3, 4)
    assert max_relative_error(logits, reference["logits_per_image"]) <= 1e-4


def test_text_pools_at_eos_and_ignores_what_follows(golden):
    model, _, _, tokens, _ = golden
    before = model.text(tokens)
    # Row 0 ends (eos) at position 4: causality hides everything after it from the pooled state.
    changed = tokens.at[0, 6:].set(7)
    after = model.text(changed)
    np.testing.assert_allclose(after[0], before[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(model.text(tokens.at[0, 2].set(7))[0], before[0], atol=1e-4)


def test_legacy_eos_rule_pools_at_the_largest_id(golden):
    model = golden[0]
    legacy = CLIPConfig(**{**model.cfg.__dict__, "eos_token_id": None})
    tokens = jnp.array([[5, 9, 63, 1, 1], [62, 3, 2, 40, 1]])
    assert model.text.eos_index(tokens).tolist() == [2, 0]  # first eos (63); none -> 0
    text = nnx.eval_shape(lambda: CLIP(legacy, rngs=nnx.Rngs(0))).text  # eos_index reads cfg only
    assert text.eos_index(tokens).tolist() == [2, 0]  # argmax of the ids: 63, then 62


def test_patchify_is_row_major_and_shapes_follow_the_config():
    images = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 4, 4, 3)
    np.testing.assert_array_equal(patches[1, 1], images[1, :4, 4:8])  # second patch: top right
    np.testing.assert_array_equal(patches[0, 2], images[0, 4:8, :4])
    cfg = small_config(image_size=16, patch_size=4, pooling="mean")
    model = nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0)))
    assert model.vision.pos_embed.shape == (16, 8)  # no class token with mean pooling
    assert model.vision.patch_embed.shape == (4, 4, 1, 8)
    embeds = nnx.eval_shape(
        lambda: CLIP(cfg, rngs=nnx.Rngs(0)).encode_image(jnp.zeros((3, 16, 16, 1)))
    )
    assert embeds.shape == (3, 4)


def small_config(**changes) -> CLIPConfig:
    tower = dict(num_layers=1, embed_dim=8, num_heads=2, mlp_dim=16)
    values = dict(
        vision=tower_config(**tower, max_seq_len=64, causal=False),
        text=tower_config(**tower, vocab_size=10, max_seq_len=6, causal=True),
        image_size=16,
        patch_size=4,
        num_channels=1,
        projection_dim=4,
    )
    return CLIPConfig(**{**values, **changes})


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(image_size=(16, 12)), r"image_size=\(16, 12\) is not square"),
        (dict(patch_size=(4, 2)), r"patch_size=\(4, 2\) is not square"),
        (dict(image_size=16, patch_size=5), "image_size=16 is not divisible by patch_size=5"),
        (dict(pooling="max"), "pooling='max'"),
    ],
)
def test_bad_patch_configs_are_rejected_clearly(changes, message):
    with pytest.raises(ValueError, match=message):
        small_config(**changes)


def test_square_tuple_image_size_is_accepted():
    assert small_config(image_size=(16, 16), patch_size=(4, 4)).num_patches == 16


def test_wrong_image_shape_is_rejected_clearly():
    def encode():
        return CLIP(small_config(), rngs=nnx.Rngs(0)).encode_image(jnp.zeros((2, 16, 12, 1)))

    with pytest.raises(
        ValueError, match=r"images have shape \(2, 16, 12, 1\).*\[batch, 16, 16, 1\]"
    ):
        nnx.eval_shape(encode)


def test_loader_names_a_missing_or_misshapen_tensor(tmp_path):
    tensors = hf.read_weights(GOLDEN)
    config = json.loads((GOLDEN / "config.json").read_text())
    shutil.copy(GOLDEN / "config.json", tmp_path / "config.json")
    name = "vision_model.encoder.layers.2.mlp.fc1.weight"
    safetensors_io.write(
        tmp_path / "model.safetensors", {k: v for k, v in tensors.items() if k != name}
    )
    with pytest.raises(hf.CheckpointError, match=f"missing tensor '{name}'"):
        load_clip_dir(tmp_path)
    bad = {**tensors, "visual_projection.weight": np.zeros((8, 17), np.float32)}
    safetensors_io.write(tmp_path / "model.safetensors", bad)
    with pytest.raises(
        hf.CheckpointError,
        match=r"'visual_projection.weight' in .* has shape \(8, 17\), but the config expects \(8, 16\)",
    ):
        load_clip_dir(tmp_path)
    with pytest.raises(hf.CheckpointError, match="model_type='clip'"):
        clip_config_from_hf({**config, "model_type": "bert"})
