"""Contrastive losses against NumPy references, the digits data, the evaluations, and a tiny
CLIP run that checkpoints and resumes. (8-device equality: test_contrastive_sharded.py.)"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from train import contrastive_data as cd
from train.config_lib import apply_overrides, load_config_script
from train.contrastive import contrastive_loss, load_trained, softmax_loss

pytestmark = pytest.mark.usefixtures("jax_compile_cache")
CONFIG = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "clip_digits.py"


def _embeddings(seed=0, batch=6, dim=5):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, dim))
    texts = images + rng.normal(size=(batch, dim))
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    return unit(images), unit(texts)


def numpy_softmax_loss(images, texts, scale):
    logits = scale * images.astype(np.float64) @ texts.T
    b = len(logits)
    total = 0.0
    for i in range(b):  # both directions, one cross entropy per row / column
        total += np.log(np.exp(logits[i]).sum()) - logits[i, i]
        total += np.log(np.exp(logits[:, i]).sum()) - logits[i, i]
    return total / (2 * b)


def numpy_sigmoid_loss(images, texts, scale, bias):
    logits = scale * images.astype(np.float64) @ texts.T + bias
    labels = 2 * np.eye(len(logits)) - 1
    return np.sum(np.log1p(np.exp(-labels * logits))) / len(logits)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_loss_matches_numpy_and_is_symmetric(kind):
    images, texts = _embeddings()
    log_scale, bias = np.float32(np.log(7.0)), np.float32(-2.5)
    ours = float(
        contrastive_loss(kind, images, texts, log_scale, bias if kind == "sigmoid" else None)
    )
    if kind == "softmax":
        reference = numpy_softmax_loss(images, texts, 7.0)
    else:
        reference = numpy_sigmoid_loss(images, texts, 7.0, -2.5)
    assert ours == pytest.approx(reference, rel=1e-5)
    # Swapping the modalities transposes the logits: both losses treat rows and columns alike.
    swapped = contrastive_loss(kind, texts, images, log_scale, bias if kind == "sigmoid" else None)
    assert float(swapped) == pytest.approx(ours, rel=1e-6)


def test_softmax_loss_rewards_alignment_and_bias_cancels():
    images, texts = _embeddings()
    aligned = float(softmax_loss(images, images, np.log(100.0)))
    assert aligned < 1e-3 < float(softmax_loss(images, texts, np.log(100.0)))
    # A constant added to every logit leaves each softmax unchanged.
    assert float(softmax_loss(images, texts, 1.0, 3.0)) == pytest.approx(
        float(softmax_loss(images, texts, 1.0)), rel=1e-5
    )


def test_sigmoid_loss_needs_a_bias_and_unknown_losses_are_named():
    images, texts = _embeddings()
    with pytest.raises(ValueError, match="needs a logit bias"):
        contrastive_loss("sigmoid", images, texts, 1.0)
    with pytest.raises(ValueError, match="loss='hinge'"):
        contrastive_loss("hinge", images, texts, 1.0)


@pytest.fixture(scope="module")
def digits():
    return cd.load_digits_split(image_size=16, test_fraction=0.2, seed=0, max_len=8)


def test_digits_split_is_stratified_and_standardised(digits):
    assert digits.train_images.shape == (1437, 16, 16, 1) and digits.test_images.shape[0] == 360
    assert np.bincount(digits.test_labels).min() >= 35  # every digit held out
    assert abs(digits.train_images.mean()) < 1e-4 and digits.train_images.std() == pytest.approx(
        1, abs=1e-3
    )


def test_batches_are_a_function_of_the_step(digits):
    a, b = digits.train_batch(7, 32), digits.train_batch(7, 32)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["images"], b["images"])
    assert not np.array_equal(digits.train_batch(8, 32)["images"], a["images"])
    assert a["tokens"].shape == (32, 8) and (a["tokens"] == cd.WordTokenizer.EOS).sum() == 32


def test_tokenizer_ends_every_caption_with_eos(digits):
    tok = digits.tokenizer
    ids = tok.encode(["a handwritten 7", "The digit SEVEN", "a zebra"])
    assert ids[0, 3] == tok.EOS and ids[0, 4:].tolist() == [tok.PAD] * 4
    assert ids[1, :3].tolist() == tok.encode(["the digit seven"])[0, :3].tolist()
    assert ids[2, 1] == tok.UNK
    with pytest.raises(ValueError, match="max_len=3"):
        cd.WordTokenizer(["a photo of the number seven"], max_len=3)


def test_retrieval_and_zero_shot_on_a_worked_example():
    labels = np.array([0, 1, 2])
    images = np.eye(3, dtype=np.float32)
    texts = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], np.float32)  # first two swapped
    recall = cd.retrieval_recall(images, texts, labels, ks=(1, 2))
    assert recall["image_to_text_r@1"] == pytest.approx(1 / 3)
    assert recall["text_to_image_r@1"] == pytest.approx(1 / 3)
    assert recall["image_to_text_r@2"] == 1.0
    assert cd.zero_shot_accuracy(images, np.array([1, 0, 2]), texts) == 1.0


@pytest.mark.slow  # two tiny runs with evaluations; tests/experiments runs one step by default
def test_runlocal_trains_checkpoints_and_resumes(tmp_path, capsys):
    from train import trainer

    def run(steps):
        config = load_config_script(f"{CONFIG}:runlocal")
        apply_overrides(
            config,
            [f"train.num_steps={steps}", "train.checkpoint_every=2", "train.eval_every=100",
             "optimizer.decay_steps=8", "train.tensorboard=False"],
        )  # fmt: skip
        return trainer.train_and_evaluate(config, tmp_path)

    first = run(2)
    assert first.final_step == 2 and np.isfinite(first.train_loss)
    second = run(4)
    assert "Resumed from step 2" in capsys.readouterr().out
    assert second.final_step == 4 and np.isfinite(second.val_loss)
    results = json.loads((tmp_path / "results.json").read_text())
    for key in ("zero_shot_top1", "linear_probe_top1", "image_to_text_r@1", "text_to_image_r@5"):
        assert 0.0 <= results[key] <= 1.0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]
    model, tokenizer = load_trained(tmp_path)  # what the notebook uses
    assert model.cfg.text.vocab_size == tokenizer.vocab_size and model.cfg.projection_dim == 16
    assert np.isfinite(np.asarray(model.logit.scale[...]))
