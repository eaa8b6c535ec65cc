"""Dense search backends: HNSW agrees with exact search, filters hold, the index can use either."""

import numpy as np
import pytest
from rag_fakes import FakeEmbedder

from rag import ann
from rag.chunking import ChunkConfig
from rag.index import Index


@pytest.fixture(scope="module")
def clustered():
    """[2000, 32] unit vectors in 40 clusters: neighbours exist, as with real embeddings."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, 32))
    x = centers[rng.integers(0, 40, 2000)] + 0.3 * rng.normal(size=(2000, 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    queries = x[rng.choice(2000, 50, replace=False)] + 0.1 * rng.normal(size=(50, 32))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    return x, queries, ann.HNSWSearch(x)


def test_hnsw_recall_against_exact(clustered):
    x, queries, hnsw = clustered
    exact = ann.ExactSearch(x)
    found = 0
    for q in queries:
        want = exact.search(q, 10)
        got = hnsw.search(q, 10)
        assert len(got) == 10 and len(set(got.tolist())) == 10
        scores = x[got] @ q
        assert np.all(np.diff(scores) <= 1e-6)  # best first
        found += len(set(want.tolist()) & set(got.tolist()))
    assert found / (10 * len(queries)) >= 0.95


def test_hnsw_filters_return_only_allowed_rows(clustered):
    x, queries, hnsw = clustered
    exact = ann.ExactSearch(x)
    rng = np.random.default_rng(1)
    broad = rng.random(len(x)) < 0.5  # answered by the graph, then filtered
    narrow = np.zeros(len(x), bool)
    narrow[rng.choice(len(x), 30, replace=False)] = True  # answered by an exact scan
    for q in queries[:10]:
        got = hnsw.search(q, 10, broad)
        assert len(got) == 10 and broad[got].all()
        assert set(got.tolist()) & set(exact.search(q, 10, broad).tolist())
        assert hnsw.search(q, 10, narrow).tolist() == exact.search(q, 10, narrow).tolist()
    assert hnsw.search(queries[0], 5, np.zeros(len(x), bool)).tolist() == []


def test_make_dense_search_picks_by_size():
    small = np.eye(4, dtype=np.float32)
    assert isinstance(ann.make_dense_search(small), ann.ExactSearch)
    assert isinstance(ann.make_dense_search(small, "hnsw"), ann.HNSWSearch)
    assert ann.make_dense_search(small, "hnsw").search(small[2], 1).tolist() == [2]
    assert len(ann.HNSWSearch(np.zeros((0, 4), np.float32)).search(small[0], 3)) == 0
    with pytest.raises(ValueError, match="dense backend='faiss'"):
        ann.make_dense_search(small, "faiss")
    with pytest.raises(ValueError, match="dense backend"):
        Index.open("/nonexistent", FakeEmbedder(), dense_backend="annoy")


def test_index_search_with_hnsw_matches_exact(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, topic in enumerate(["globe theatre fire", "sonnets thorpe", "stratford birth"]):
        (docs / f"d{i}.txt").write_text(
            " ".join(f"Sentence {j} about the {topic} and item{j}." for j in range(40))
        )
    config = ChunkConfig(24, 4)
    with Index.open(tmp_path / "idx", FakeEmbedder(), create=True, config=config) as exact:
        exact.add_paths([docs])
        want = exact.search("the sonnets of thorpe", 5, mode="dense")
    with Index.open(tmp_path / "idx", FakeEmbedder(), dense_backend="hnsw") as index:
        assert isinstance(index.dense_search, ann.HNSWSearch)
        got = index.search("the sonnets of thorpe", 5, mode="dense")
        assert [h.row for h in got] == [h.row for h in want]
        assert [h.dense for h in got] == pytest.approx([h.dense for h in want], abs=1e-5)
        hybrid = index.search("the sonnets of thorpe", 3, source_contains="d1")
        assert hybrid and all(h.chunk.source.endswith("d1.txt") for h in hybrid)
