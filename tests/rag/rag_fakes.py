"""Test doubles for RAG: a tiny deterministic embedder with the `Embedder` interface."""

import hashlib
import re

import numpy as np

_TOKEN = re.compile(r"\w+|[^\w\s]")


class FakeEmbedder:
    """Hashed bag of lowercased words -> unit vectors; tokens are words and punctuation marks."""

    def __init__(self, name: str = "fake-bow", dim: int = 64):
        self.name, self.dim, self.max_tokens = name, dim, 254
        self.calls: list[int] = []  # number of texts per embed() call

    def count_tokens(self, text: str) -> int:
        return len(_TOKEN.findall(text))

    def embed(self, texts):
        self.calls.append(len(texts))
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
            out[i] /= max(np.linalg.norm(out[i]), 1e-6)
        return out
