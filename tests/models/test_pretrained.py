"""Real weights end to end: SmolLM2-135M-Instruct (GGUF Q4_1) and all-MiniLM-L6-v2 (HF dir).

References come from tests/fixtures/make_golden.py: PyTorch/transformers on the same
dequantized weights (SmolLM2) and sentence-transformers (MiniLM).
"""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from infer import generate
from models import gguf, hub, load_pretrained

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures"


def _load(name):
    try:
        return load_pretrained(name)
    except hub.PackageUnavailable as e:
        pytest.skip(f"{name} unavailable: {e}")


@pytest.fixture(scope="module")
def smollm2():
    return _load("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def minilm():
    return _load("all-minilm-l6-v2")


@pytest.fixture(scope="module")
def smollm2_reference():
    return json.loads((FIXTURES / "smollm2_reference.json").read_text())


@pytest.mark.data
@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2, smollm2_reference):
    ref = smollm2_reference
    ids = smollm2.tokenizer.apply_chat_template(ref["messages"], add_generation_prompt=True)
    assert ids == ref["prompt_ids"]
    logits = np.asarray(smollm2.model(jnp.asarray([ids]))[0])
    ours = logits[:, ref["logit_ids"]]
    expected = np.asarray(ref["logits_at_ids"], np.float32)
    error = np.abs(ours - expected).max() / np.abs(expected).max()
    assert error <= 1e-4, error
    top20 = np.argsort(-logits[-1])[:20]
    assert list(top20[:5]) == ref["last_top20_ids"][:5]


@pytest.mark.data
@pytest.mark.slow
def test_smollm2_answers_the_capital_of_france(smollm2, smollm2_reference):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    answer = generate(smollm2, messages, max_tokens=32, temperature=0.0)
    assert "Paris" in answer
    expected = smollm2_reference["greedy_text"].replace("<|im_end|>", "")
    assert answer == expected
    assert smollm2.config.num_layers == 30 and smollm2.config.num_kv_heads == 3
    assert isinstance(smollm2.gguf_file, gguf.GGUFFile)  # the quantized form stays available
    assert smollm2.gguf_file.tensors["blk.0.attn_q.weight"].ggml_type == "Q4_1"


@pytest.mark.data
@pytest.mark.slow
def test_smollm2_export_round_trip(smollm2, tmp_path):
    smollm2.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    again = load_pretrained(tmp_path)
    tokens = jnp.asarray([smollm2.tokenizer.encode("To be, or not to be")])
    np.testing.assert_array_equal(
        np.asarray(smollm2.model(tokens)), np.asarray(again.model(tokens))
    )
    messages = [{"role": "user", "content": "Hi"}]
    assert again.tokenizer.apply_chat_template(messages) == smollm2.tokenizer.apply_chat_template(
        messages
    )


@pytest.mark.data
def test_minilm_embeddings_match_sentence_transformers(minilm):
    ref = json.loads((FIXTURES / "minilm_reference.json").read_text())
    for sentence, ids in zip(ref["sentences"], ref["token_ids"], strict=True):
        assert minilm.tokenizer.encode(sentence, add_special_tokens=True) == ids
    ours = minilm.embed(ref["sentences"], batch_size=4)  # two batches, the second padded
    expected = np.asarray(ref["embeddings"], np.float32)
    assert ours.shape == expected.shape == (len(ref["sentences"]), 384)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cosines = (ours * expected).sum(axis=1) / np.linalg.norm(expected, axis=1)
    assert cosines.min() >= 0.999, cosines
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="not a registered name"):
        load_pretrained("no-such-model")


def test_non_gguf_file_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="must be a .gguf"):
        load_pretrained(path)
    with pytest.raises(ValueError, match="dtype"):
        load_pretrained("smollm2-135m-instruct", dtype="float64")


def test_truncated_gguf_is_a_clear_error(tmp_path):
    source = FIXTURES / "golden" / "llama_gguf" / "model.gguf"
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(gguf.GGUFError, match="truncated"):
        load_pretrained(cut)
