"""The embedder interface RAG depends on, and its implementation by the project's MiniLM.

Indexing and search take an `Embedder` explicitly, so tests can pass a tiny fake with the same
four members instead of loading real weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import tqdm

DEFAULT_EMBEDDER = "all-minilm-l6-v2"


class Embedder(Protocol):
    """What indexing and search need from a sentence embedder."""

    name: str  # recorded in the index manifest; an index only opens with the same name
    dim: int
    max_tokens: int  # most tokens of a chunk (excluding special tokens) the model reads

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[n] strings -> float32 [n, dim] unit vectors."""
        ...

    def count_tokens(self, text: str) -> int:
        """Number of the model's tokens in `text`, without special tokens."""
        ...


class PretrainedEmbedder:
    """Wraps `models.load_pretrained(name)` (a `SentenceEmbedder`) with a progress bar."""

    def __init__(self, name: str = DEFAULT_EMBEDDER, batch_size: int = 32, progress: bool = True):
        from models import load_pretrained  # deferred: importing JAX models is slow

        model = load_pretrained(name)
        if not hasattr(model, "embed"):
            raise ValueError(f"{name!r} is a language model, not a sentence embedder")
        self.model = model
        self.name = name
        self.dim = int(model.dim)
        self.max_tokens = int(model.max_seq_len) - 2  # [CLS] and [SEP]
        self.batch_size = batch_size
        self.progress = progress

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenizer.encode(text, add_special_tokens=False))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        # Sorting by length keeps padding, hence compute, low in each batch.
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.dim), np.float32)
        step = self.batch_size * 4
        show = self.progress and len(texts) > step
        with tqdm.tqdm(total=len(texts), desc="embedding", unit="chunk", disable=not show) as bar:
            for s in range(0, len(texts), step):
                idx = order[s : s + step]
                out[idx] = self.model.embed([texts[i] for i in idx], batch_size=self.batch_size)
                bar.update(len(idx))
        return out
