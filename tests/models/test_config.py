"""Tests for models/config.py: validation messages, derived fields, presets and counting."""

from __future__ import annotations

import pytest

from models import config as config_lib
from models.config import ModelConfig

SMALL = dict(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, mlp_dim=64, max_seq_len=32)


def test_derived_defaults():
    cfg = ModelConfig(**SMALL)
    assert cfg.num_kv_heads == 4 and cfg.head_dim == 8


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(num_kv_heads=3), "num_kv_heads"),  # 4 heads are not divisible by 3
        (dict(head_dim=7, position="rope"), "head_dim"),  # RoPE rotates pairs
        (dict(norm="batchnorm"), "norm"),
        (dict(mlp_activation="tanh"), "mlp_activation"),
        (dict(position="sinusoidal"), "position"),
        (dict(architecture="mixture"), "architecture"),
        (dict(rope_dim=5), "rope_dim"),
        (dict(position="alibi", attention_impl="pallas"), "attention_impl"),
        (dict(block_positions=True, position="rope"), "block_positions"),
        (dict(remat_policy="some"), "remat_policy"),
        (dict(dtype="float64"), "dtype"),
        (dict(scan_unroll=3), "scan_unroll"),
        (dict(dropout_rate=1.0), "dropout_rate"),
        (dict(embed_dim=30), "embed_dim"),  # 30 / 4 heads with no explicit head_dim
        (dict(vocab_size=0), "vocab_size"),
    ],
)
def test_invalid_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**SMALL, **changes})


def test_kv_head_message_names_both_values():
    with pytest.raises(ValueError, match="num_heads=4 is not divisible by num_kv_heads=3"):
        ModelConfig(**SMALL, num_kv_heads=3)


def test_odd_head_dim_is_fine_without_rope():
    assert ModelConfig(**SMALL, head_dim=7, position="learned").head_dim == 7


def test_from_dict_names_unknown_keys_and_round_trips():
    cfg = config_lib.smollm2_135m()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="num_layer"):
        ModelConfig.from_dict({**SMALL, "num_layer": 3})


def test_replace_validates():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(**SMALL).replace(num_kv_heads=3)


@pytest.mark.parametrize(
    "name, published",
    [
        ("gpt2-124m", 124_439_808),
        ("smollm2-135m", 134_515_008),
        ("llama3-8b", 8_030_261_248),
        ("qwen2-0.5b", 494_032_768),
    ],
)
def test_num_params_matches_published(name, published):
    assert config_lib.preset(name).num_params() == published


def test_preset_overrides_and_unknown_names():
    assert config_lib.preset("llama3-8b", dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ValueError, match="llama3-70b"):
        config_lib.preset("llama3-70b")
    with pytest.raises(ValueError, match="2b"):
        config_lib.gpt2("2b")


def test_flops_per_token_follows_the_6n_plus_attention_rule():
    cfg = config_lib.gpt2("124m")
    non_embedding = cfg.num_params(include_embeddings=False)
    expected = 6 * (non_embedding + cfg.vocab_size * cfg.embed_dim) + 12 * 12 * 768 * 1024
    assert cfg.flops_per_token(1024) == expected
