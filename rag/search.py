"""Exact dense search, BM25, reciprocal rank fusion and metadata filters over chunk arrays.

Everything here works on row indices into one chunk list / vector matrix, so the index can hand
its arrays over without copying. Dense search is exact (one matrix-vector product): the
reference any approximate index would be measured against.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Sequence

import numpy as np

# Words too common to tell documents apart; kept short so questions keep their content words.
_STOPWORDS = frozenset(
    "a an and are as at be by for from has have he her his i in is it its of on or she that "
    "the their there they this to was were which who whom with what when where how did do does "
    "you your".split()
)
_WORD = re.compile(r"\w+")


def bm25_tokenize(text: str) -> list[str]:
    """Lowercased word tokens without stopwords (no stemming)."""
    return [w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]


class BM25:
    """Okapi BM25 (Robertson & Zaragoza 2009, eq. 3.15) with Lucene's non-negative idf.

    score(q, d) = sum_t idf(t) * f(t,d) * (k1 + 1) / (f(t,d) + k1 * (1 - b + b * |d| / avgdl)),
    idf(t) = ln(1 + (N - n(t) + 0.5) / (n(t) + 0.5)).
    """

    def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        docs = [bm25_tokenize(t) for t in texts]
        self.num_docs = len(docs)
        self.doc_len = np.array([len(d) for d in docs], np.float32)
        self.avgdl = float(self.doc_len.mean()) if docs else 0.0
        # Inverted index: term -> (row indices, term frequencies).
        postings: dict[str, tuple[list[int], list[int]]] = collections.defaultdict(lambda: ([], []))
        for row, doc in enumerate(docs):
            for term, tf in collections.Counter(doc).items():
                postings[term][0].append(row)
                postings[term][1].append(tf)
        # The length normalisation of eq. 3.15's denominator, fixed per document.
        self.norm = k1 * (1.0 - b + b * self.doc_len / max(self.avgdl, 1e-9))
        self.postings = {
            t: (np.array(r, np.int64), np.array(f, np.float32)) for t, (r, f) in postings.items()
        }

    def idf(self, term: str) -> float:
        n = len(self.postings[term][0]) if term in self.postings else 0
        return math.log(1.0 + (self.num_docs - n + 0.5) / (n + 0.5))

    def scores(self, query: str) -> np.ndarray:
        """float32 [num_docs] BM25 scores of every chunk for `query` (0 where no term matches)."""
        out = np.zeros(self.num_docs, np.float32)
        if not self.num_docs:
            return out
        for term in set(bm25_tokenize(query)):
            if term not in self.postings:
                continue
            rows, tf = self.postings[term]
            out[rows] += self.idf(term) * tf * (self.k1 + 1.0) / (tf + self.norm[rows])
        return out


def top_k(scores: np.ndarray, k: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Row indices of the k highest scores (ties by lower row), restricted to `mask`."""
    rows = np.arange(len(scores)) if mask is None else np.flatnonzero(mask)
    if not len(rows) or k <= 0:
        return np.zeros(0, np.int64)
    values = scores[rows]
    if k < len(rows):  # keep the k best and everything tied with the k-th, then sort those
        kth = np.partition(values, len(rows) - k)[len(rows) - k]
        keep = values >= kth
        rows, values = rows[keep], values[keep]
    order = np.lexsort((rows, -values))  # last key is primary
    return rows[order[:k]]


def dense_scores(query_vector: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Cosine similarities of unit vectors: [dim], [n, dim] -> [n]."""
    return vectors @ query_vector.astype(vectors.dtype)


def bm25_ranking(bm25: BM25, query: str, k: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Rows with a positive BM25 score, best first (a chunk sharing no term is not a hit)."""
    scores = bm25.scores(query)
    positive = scores > 0 if mask is None else (scores > 0) & mask
    return top_k(scores, k, positive)


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[int]], k: int = 60
) -> list[tuple[int, float]]:
    """Fuses rankings (best first) by RRF (Cormack et al. 2009): score(d) = sum 1 / (k + rank).

    Ranks start at 1. Returns (item, score) pairs, best first; ties keep first-seen order.
    """
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            fused[int(item)] = fused.get(int(item), 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda kv: -kv[1])


def metadata_mask(
    sources: Sequence[str], source: str | Sequence[str] | None = None, contains: str | None = None
) -> np.ndarray | None:
    """Boolean [n] mask of chunks whose source is one of `source` / contains `contains`.

    None when no filter is given (search everything).
    """
    if source is None and contains is None:
        return None
    wanted = {source} if isinstance(source, str) else set(source or ())
    return np.array(
        [(not wanted or s in wanted) and (contains is None or contains in s) for s in sources],
        bool,
    )
