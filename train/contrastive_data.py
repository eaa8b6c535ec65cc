"""Image-text pairs from scikit-learn's handwritten digits, a word tokenizer, and the evaluations
of a contrastive model: zero-shot accuracy with prompt ensembles, a linear probe, retrieval.

The images are `sklearn.datasets.load_digits` (1,797 real 8x8 scans of handwritten digits, shipped
inside the package, no download), upsampled bilinearly and standardised. Each image is paired
with a caption made from a template ("a handwritten 7", "the digit seven"); a training step draws
a template per image, so the text tower sees several phrasings of every class.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {word} is the digit spelled out, {digit} the numeral.
TRAIN_TEMPLATES = (
    "a photo of the number {word}",
    "a handwritten {digit}",
    "the digit {word}",
    "a drawing of a {digit}",
    "an image of the number {digit}",
    "a handwritten {word}",
    "a scan of the digit {digit}",
)
# The zero-shot ensemble: new combinations of the training vocabulary, averaged per class.
ZERO_SHOT_TEMPLATES = (
    "the number {word}",
    "a photo of the digit {digit}",
    "an image of a handwritten {word}",
    "a drawing of the number {digit}",
    "a scan of a {word}",
)


def caption(template: str, label: int) -> str:
    return template.format(word=DIGIT_WORDS[label], digit=str(label))


class WordTokenizer:
    """Lower-case whitespace words -> ids; 0 is padding, 1 end-of-text (where the text tower
    pools), 2 an unknown word; the vocabulary is every word of the caption templates."""

    PAD, EOS, UNK = 0, 1, 2

    def __init__(self, texts: list[str], max_len: int):
        words = sorted({w for text in texts for w in self.split(text)})
        self.vocab = {w: i + 3 for i, w in enumerate(words)}
        self.max_len = max_len
        longest = max(len(self.split(t)) for t in texts) + 1
        if longest > max_len:
            raise ValueError(f"a caption needs {longest} tokens with its eos; max_len={max_len}")

    @staticmethod
    def split(text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", text.lower())

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + 3

    def encode(self, texts: list[str]) -> np.ndarray:
        """Texts -> [N, max_len] int32 ids: the words, eos, then padding (longer texts cut)."""
        out = np.full((len(texts), self.max_len), self.PAD, np.int32)
        for row, text in enumerate(texts):
            ids = [self.vocab.get(w, self.UNK) for w in self.split(text)][: self.max_len - 1]
            out[row, : len(ids) + 1] = ids + [self.EOS]
        return out


@dataclasses.dataclass
class DigitsData:
    """A fixed, stratified train/test split of load_digits as [N, S, S, 1] float32 images."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    tokenizer: WordTokenizer
    seed: int

    def train_batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """The batch of `step`: a function of (seed, step) only, so a resumed run sees the same
        stream. Each epoch is a fresh permutation; each image gets a random template."""
        n = len(self.train_labels)
        per_epoch = n // batch_size
        if per_epoch == 0:
            raise ValueError(f"batch_size={batch_size} exceeds the {n} training images")
        epoch, i = divmod(step, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        index = order[i * batch_size : (i + 1) * batch_size]
        templates = np.random.default_rng([self.seed, 1, step]).integers(
            len(TRAIN_TEMPLATES), size=batch_size
        )
        labels = self.train_labels[index]
        texts = [caption(TRAIN_TEMPLATES[t], y) for t, y in zip(templates, labels, strict=True)]
        return {"images": self.train_images[index], "tokens": self.tokenizer.encode(texts)}

    def test_captions(self) -> list[str]:
        """One caption per held-out image, cycling through the training templates."""
        k = len(TRAIN_TEMPLATES)
        return [caption(TRAIN_TEMPLATES[i % k], y) for i, y in enumerate(self.test_labels)]


def load_digits_split(
    image_size: int = 16, test_fraction: float = 0.2, seed: int = 0, max_len: int = 16
) -> DigitsData:
    """Loads, splits (stratified by digit), upsamples and standardises the digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # [1797, 8, 8], ink 0..16
    labels = digits.target.astype(np.int32)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )

    def prepare(x: np.ndarray) -> np.ndarray:
        x = jax.image.resize(jnp.asarray(x), (len(x), image_size, image_size), "bilinear")
        return np.asarray(x)[..., None]

    train_x, test_x = prepare(train_x), prepare(test_x)
    mean, std = train_x.mean(), train_x.std()  # statistics of the training split only
    texts = [caption(t, d) for t in TRAIN_TEMPLATES + ZERO_SHOT_TEMPLATES for d in range(10)]
    return DigitsData(
        train_images=(train_x - mean) / std,
        train_labels=train_y,
        test_images=(test_x - mean) / std,
        test_labels=test_y,
        tokenizer=WordTokenizer(texts, max_len),
        seed=seed,
    )


# ------------------------------------------------------------------------------------------------
# Evaluation.


def class_text_embeddings(encode_text, tokenizer: WordTokenizer, templates) -> np.ndarray:
    """The prompt ensemble (CLIP, section 3.1.4): per class, the mean of the unit-norm embeddings
    of its captions, renormalised. `encode_text`: [N, T] ids -> unit-norm [N, E]. -> [10, E]."""
    texts = [caption(t, d) for d in range(10) for t in templates]
    emb = np.asarray(encode_text(tokenizer.encode(texts))).reshape(10, len(templates), -1)
    mean = emb.mean(axis=1)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def zero_shot_accuracy(image_embeds: np.ndarray, labels: np.ndarray, class_embeds) -> float:
    """Top-1 accuracy of predicting the class whose text embedding is nearest each image."""
    predictions = np.argmax(np.asarray(image_embeds) @ np.asarray(class_embeds).T, axis=-1)
    return float(np.mean(predictions == labels))


def retrieval_recall(
    image_embeds: np.ndarray, text_embeds: np.ndarray, labels: np.ndarray, ks=(1, 5)
) -> dict[str, float]:
    """Recall@k both ways between paired images and captions (pair i shows digit labels[i]).

    A retrieved item counts when it shows or names the query's digit: captions of the same
    template and digit are identical strings, so instance-level recall would be ill-posed.
    """
    sims = np.asarray(image_embeds) @ np.asarray(text_embeds).T  # [N images, N texts]
    out = {}
    for name, s in (("image_to_text", sims), ("text_to_image", sims.T)):
        top = np.argsort(-s, axis=1)[:, : max(ks)]
        hits = labels[top] == labels[:, None]
        for k in ks:
            out[f"{name}_r@{k}"] = float(np.mean(hits[:, :k].any(axis=1)))
    return out


def linear_probe_accuracy(train_x, train_y, test_x, test_y, seed: int = 0) -> float:
    """Logistic regression on frozen features (CLIP, section 3.2), scored on the test split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    probe = LogisticRegression(max_iter=2000, random_state=seed)
    probe.fit(scaler.transform(train_x), train_y)
    return float(probe.score(scaler.transform(test_x), test_y))
