"""PEFT adapters: peft's golden adapters load to peft's logits; ours round-trip; bad ones fail.

tests/fixtures/make_peft_golden.py wrote golden/llama_lora and golden/qwen2_lora with peft
(random nonzero A and B) beside the tiny golden base checkpoints.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import hf, safetensors_io
from models.config import ModelConfig
from models.decoder import Decoder
from models.lora import LoRAConfig, apply_lora, load_adapter, lora_modules, save_adapter
from models.peft import AdapterError
from models.quantize import quantize

pytestmark = pytest.mark.usefixtures("jax_compile_cache")

GOLDEN = pathlib.Path(__file__).parents[1] / "fixtures" / "golden"
PEER_PYTHON = os.environ.get("JAXLM_PEER_PYTHON")


@nnx.jit
def forward(model, tokens):
    return model(tokens)


def relative(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module")
def llama_model():
    return hf.load_hf_dir(GOLDEN / "llama")[1]


def adapted_llama(llama_model, config: LoRAConfig, seed: int = 0):
    """The golden llama with random nonzero adapters."""
    model = apply_lora(nnx.clone(llama_model), config, nnx.Rngs(seed))
    for i, module in enumerate(lora_modules(model).values()):
        shape = module.lora_b[...].shape
        module.lora_b[...] = jax.random.normal(jax.random.key(seed + i), shape) * 0.3
    return model


@pytest.mark.parametrize("name", ["llama_lora", "qwen2_lora"])
def test_peft_adapters_give_peft_logits(name):
    base_name = name.removesuffix("_lora")
    model = hf.load_hf_dir(GOLDEN / base_name)[1]
    reference = np.load(GOLDEN / name / "reference.npz")
    config = load_adapter(model, GOLDEN / name)
    settings = json.loads((GOLDEN / name / "adapter_config.json").read_text())
    assert config.rank == settings["r"] and config.rslora == settings["use_rslora"]
    assert set(config.targets) == set(settings["target_modules"])
    logits = forward(model, jnp.asarray(reference["input_ids"]))
    assert relative(logits, reference["logits"]) <= 1e-4


def test_round_trip(tmp_path, llama_model):
    config = LoRAConfig(
        rank=3, alpha=5.0, targets=("up_proj", r"blocks/attn/[qo]_proj"), rslora=True
    )
    model = adapted_llama(llama_model, config)
    save_adapter(model, config, tmp_path / "adapter", base_model="tiny-llama")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files left
    settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert settings["target_modules"] == ["o_proj", "q_proj", "up_proj"]
    assert (settings["r"], settings["lora_alpha"], settings["use_rslora"]) == (3, 5.0, True)
    tensors, _ = safetensors_io.read(tmp_path / "adapter" / "adapter_model.safetensors")
    name = "base_model.model.model.layers.1.self_attn.o_proj.lora_{}.weight"
    assert tensors[name.format("A")].shape == (3, 64)  # [r, in = N * H]
    assert tensors[name.format("B")].shape == (64, 3)  # [out = D, r]

    fresh = nnx.clone(llama_model)
    loaded = load_adapter(fresh, tmp_path / "adapter")
    assert loaded.rank == 3 and loaded.scale == config.scale
    ours, theirs = lora_modules(model), lora_modules(fresh)
    assert sorted(ours) == sorted(theirs)
    for path in ours:
        np.testing.assert_array_equal(theirs[path].lora_a[...], ours[path].lora_a[...])
        np.testing.assert_array_equal(theirs[path].lora_b[...], ours[path].lora_b[...])
    tokens = jnp.arange(14, dtype=jnp.int32).reshape(2, 7)
    np.testing.assert_array_equal(forward(fresh, tokens), forward(model, tokens))


def test_adapter_loads_onto_a_quantized_base(llama_model):
    model = quantize(nnx.clone(llama_model), "int8", None)
    load_adapter(model, GOLDEN / "llama_lora")
    reference = np.load(GOLDEN / "llama_lora" / "reference.npz")
    assert relative(forward(model, jnp.asarray(reference["input_ids"])), reference["logits"]) < 0.05


@pytest.fixture
def adapter_copy(tmp_path):
    shutil.copytree(GOLDEN / "llama_lora", tmp_path / "adapter")
    return tmp_path / "adapter"


def _edit_tensors(path: pathlib.Path, edit) -> None:
    tensors, _ = safetensors_io.read(path / "adapter_model.safetensors")
    tensors = {k: np.array(v) for k, v in tensors.items()}
    edit(tensors)
    safetensors_io.write(path / "adapter_model.safetensors", tensors)


def test_bad_adapters_fail_with_named_errors(adapter_copy, llama_model):
    name = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    _edit_tensors(adapter_copy, lambda t: t.pop(name))
    with pytest.raises(AdapterError, match=f"missing tensor '{name}'"):
        load_adapter(nnx.clone(llama_model), adapter_copy)

    _edit_tensors(adapter_copy, lambda t: t.update({name: np.zeros((4, 96), np.float32)}))
    with pytest.raises(AdapterError, match=r"shape \(4, 96\).*expects \(4, 128\)"):
        load_adapter(nnx.clone(llama_model), adapter_copy)

    extra = "base_model.model.lm_head.lora_A.weight"
    _edit_tensors(adapter_copy, lambda t: t.update({extra: np.zeros((4, 64), np.float32)}))
    with pytest.raises(AdapterError, match="lm_head"):
        load_adapter(nnx.clone(llama_model), adapter_copy)

    settings = json.loads((adapter_copy / "adapter_config.json").read_text())
    (adapter_copy / "adapter_config.json").write_text(json.dumps({**settings, "use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora=True is not supported"):
        load_adapter(nnx.clone(llama_model), adapter_copy)


def test_adapter_for_another_base_is_refused():
    """The llama adapter onto a llama of other widths: the first tensor's shape is named."""
    cfg = ModelConfig(
        vocab_size=256, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=128,
        max_seq_len=16,
    )  # fmt: skip
    with pytest.raises(AdapterError, match="trained for another base"):
        load_adapter(Decoder(cfg, rngs=nnx.Rngs(0)), GOLDEN / "llama_lora")


def test_fused_architectures_are_refused():
    cfg = ModelConfig(
        vocab_size=64, num_layers=1, embed_dim=32, num_heads=4, mlp_dim=64, max_seq_len=16,
        norm="layernorm", mlp_activation="gelu", position="learned", qkv_bias=True,
        out_bias=True, tie_embeddings=True,
    )  # fmt: skip
    model = apply_lora(Decoder(cfg, rngs=nnx.Rngs(0)), LoRAConfig(), nnx.Rngs(0))
    with pytest.raises(AdapterError, match="c_attn"):
        save_adapter(model, LoRAConfig(), "/nonexistent")


@pytest.mark.skipif(not PEER_PYTHON, reason="set JAXLM_PEER_PYTHON to a python with peft")
def test_peft_loads_our_adapter_to_our_logits(tmp_path, llama_model):
    config = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    model = adapted_llama(llama_model, config, seed=3)
    save_adapter(model, config, tmp_path / "adapter")
    tokens = np.random.default_rng(1).integers(0, 256, (2, 9)).astype(np.int32)
    np.savez(tmp_path / "ours.npz", input_ids=tokens, logits=np.asarray(forward(model, tokens)))
    result = subprocess.run(
        [
            PEER_PYTHON,
            str(GOLDEN.parent / "make_peft_golden.py"),
            "check-adapter",
            str(tmp_path / "adapter"),
            "--base",
            str(GOLDEN / "llama"),
            "--expect",
            str(tmp_path / "ours.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
