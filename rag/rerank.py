"""Reranking the fused top-k by the best-matching sentence window of each chunk.

No cross-encoder is available offline, so the reranker reuses the bi-encoder differently: a
128-token chunk's single vector averages over everything in it, while a question or a
paraphrased line usually matches one or two sentences. Each candidate is split into windows of
`window` consecutive sentences, every window is embedded, and the chunk's window score is its
best window's cosine with the query. The final order fuses the first-stage order with the
window order by RRF (`combine="rrf"`), or uses the window score alone (`combine="max"`).
Whether it helps is measured in docs/rag.md, not assumed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from rag import search as search_lib
from rag.embed import Embedder

# A sentence (or clause) ends at . ! ? ; : followed by space, as in `rag.chunking`.
_SENTENCE_END = re.compile(r"(?<=[.!?;:])[\"')\]]?\s+")


def sentence_windows(text: str, window: int = 2, stride: int = 1) -> list[str]:
    """Runs of `window` consecutive sentences starting every `stride` sentences.

    The last window always ends with the last sentence; a text of at most `window` sentences
    is one window.
    """
    if window < 1 or stride < 1:
        raise ValueError(f"window={window} and stride={stride} must be at least 1")
    sentences = [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]
    if len(sentences) <= window:
        return [" ".join(sentences)] if sentences else [text]
    starts = list(range(0, len(sentences) - window + 1, stride))
    if starts[-1] != len(sentences) - window:
        starts.append(len(sentences) - window)
    return [" ".join(sentences[i : i + window]) for i in starts]


class WindowReranker:
    """Re-scores candidate chunks by their best sentence window (see the module docstring).

    Args:
      embedder: the index's embedder (windows and query must share a vector space).
      window: sentences per window.
      stride: sentences between window starts; None = window (each sentence embedded once,
        about half the cost of overlapping windows).
      combine: "rrf" fuses the first-stage order with the window order; "max" sorts by the
        window score alone.
      rrf_k: the RRF constant for "rrf".
    """

    def __init__(
        self,
        embedder: Embedder,
        window: int = 2,
        stride: int | None = None,
        combine: str = "rrf",
        rrf_k: int = 60,
    ):
        if combine not in ("rrf", "max"):
            raise ValueError(f"combine={combine!r} is not one of 'rrf', 'max'")
        self.embedder, self.window, self.combine, self.rrf_k = embedder, window, combine, rrf_k
        self.stride = window if stride is None else stride
        self._cache: dict[str, np.ndarray] = {}  # chunk text -> [windows, dim]

    def window_vectors(self, texts: Sequence[str]) -> list[np.ndarray]:
        """[windows_i, dim] vectors per text; texts seen before are not embedded again."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if todo:
            windows = [sentence_windows(t, self.window, self.stride) for t in todo]
            flat = [w for ws in windows for w in ws]
            vectors = np.asarray(self.embedder.embed(flat), np.float32)
            offset = 0
            for text, ws in zip(todo, windows, strict=True):
                self._cache[text] = vectors[offset : offset + len(ws)]
                offset += len(ws)
        return [self._cache[t] for t in texts]

    def window_scores(self, query_vector: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """float32 [len(texts)]: each text's best window cosine with the query."""
        vectors = self.window_vectors(texts)
        return np.array([float(np.max(v @ query_vector)) for v in vectors], np.float32)

    def rerank(self, query_vector: np.ndarray, hits: Sequence) -> list:
        """Reorders `hits` (best first, `rag.index.Hit`s); each gets its new score.

        Args:
          query_vector: [dim] unit embedding of the query.
          hits: the first-stage results, best first.
        """
        if not hits:
            return []
        scores = self.window_scores(query_vector, [h.chunk.text for h in hits])
        if self.combine == "max":
            order = np.lexsort((np.arange(len(hits)), -scores))
            return [dataclasses.replace(hits[i], score=float(scores[i])) for i in order]
        by_window = np.lexsort((np.arange(len(hits)), -scores))
        fused = search_lib.reciprocal_rank_fusion(
            [list(range(len(hits))), by_window.tolist()], k=self.rrf_k
        )
        return [dataclasses.replace(hits[i], score=s) for i, s in fused]
