"""Dense top-k search backends: exact (the reference) and an HNSW graph from faiss.

Both rank rows of one float32 [n, dim] matrix of unit vectors by cosine (= inner product) with
a query vector. `experiments/benchmarks/rag_index.py` measures HNSW from faiss and from usearch
against exact search (recall@10, build time, latency): at the same recall faiss answered ~3x
faster (docs/rag.md; measured under heavy shared load), hence faiss. `AUTO_ANN_MIN_ROWS` too.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from rag import search as search_lib

# Below this many chunks exact search is used: it is exact, needs no build (an HNSW graph of 50k
# rows took minutes to build on the shared 2-core VM), and one [n, 384] mat-vec over the whole
# Shakespeare corpus (19k chunks, ~30 MB) costs a few ms, less than embedding the query. Exact
# latency grows linearly (136 ms p50 at 50k rows under heavy load, docs/rag.md), so from a few
# hundred thousand chunks on the graph's sub-millisecond queries are worth its build.
AUTO_ANN_MIN_ROWS = 200_000
# With a filter, the graph is asked for this many times k rows before the mask is applied.
FILTER_OVERSAMPLE = 8


class DenseSearch(Protocol):
    """Top-k rows of the vector matrix by inner product with a unit query vector."""

    def search(self, query: np.ndarray, k: int, mask: np.ndarray | None = None) -> np.ndarray:
        """query: [dim]; mask: bool [n] or None -> int64 [<= k] rows, best first."""
        ...


class ExactSearch:
    """One matrix-vector product over every row: slow for huge n, never wrong."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors

    def search(self, query: np.ndarray, k: int, mask: np.ndarray | None = None) -> np.ndarray:
        return search_lib.top_k(search_lib.dense_scores(query, self.vectors), k, mask)


class HNSWSearch:
    """faiss's HNSW graph (Malkov & Yashunin 2018, `IndexHNSWFlat`) over inner products.

    Args:
      vectors: float32 [n, dim] unit vectors; row i gets id i.
      connectivity: graph degree M; 16 is the usual accuracy / memory trade-off.
      expansion_add: candidate list while building (efConstruction).
      expansion_search: candidate list while searching (efSearch); raises recall and latency.
    """

    def __init__(
        self,
        vectors: np.ndarray,
        connectivity: int = 16,
        expansion_add: int = 128,
        expansion_search: int = 64,
    ):
        import faiss  # deferred: only large indexes need it

        if vectors.ndim != 2:
            raise ValueError(f"vectors must be [n, dim], got shape {vectors.shape}")
        self.vectors = np.ascontiguousarray(vectors, np.float32)
        self.index = faiss.IndexHNSWFlat(
            self.vectors.shape[1], connectivity, faiss.METRIC_INNER_PRODUCT
        )
        self.index.hnsw.efConstruction = expansion_add
        self.index.hnsw.efSearch = expansion_search
        if len(self.vectors):
            self.index.add(self.vectors)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def _graph_rows(self, query: np.ndarray, count: int) -> np.ndarray:
        count = min(count, len(self.vectors))
        if count <= 0:
            return np.zeros(0, np.int64)
        _, ids = self.index.search(np.asarray(query, np.float32)[None], count)
        ids = ids[0].astype(np.int64)
        return ids[ids >= 0]  # -1 pads when the graph returns fewer than asked

    def search(self, query: np.ndarray, k: int, mask: np.ndarray | None = None) -> np.ndarray:
        if mask is None:
            rows = self._graph_rows(query, k)
        else:
            allowed = int(mask.sum())
            # A selective filter leaves few rows: scanning them exactly is cheap and exact.
            if allowed <= FILTER_OVERSAMPLE * k * 4:
                return search_lib.top_k(search_lib.dense_scores(query, self.vectors), k, mask)
            rows = self._graph_rows(query, FILTER_OVERSAMPLE * k)
            rows = rows[mask[rows]]
            if len(rows) < min(k, allowed):  # the graph's neighbourhood missed the filter
                return search_lib.top_k(search_lib.dense_scores(query, self.vectors), k, mask)
        # Re-sort by exact scores so ties and order match `ExactSearch` where the sets agree.
        scores = self.vectors[rows] @ np.asarray(query, np.float32)
        return rows[np.lexsort((rows, -scores))][:k]


def make_dense_search(vectors: np.ndarray, backend: str = "auto") -> DenseSearch:
    """ "exact", "hnsw", or "auto" (HNSW from AUTO_ANN_MIN_ROWS rows on, else exact)."""
    if backend not in ("auto", "exact", "hnsw"):
        raise ValueError(f"dense backend={backend!r} is not one of 'auto', 'exact', 'hnsw'")
    if backend == "hnsw" or (backend == "auto" and len(vectors) >= AUTO_ANN_MIN_ROWS):
        return HNSWSearch(vectors)
    return ExactSearch(vectors)
