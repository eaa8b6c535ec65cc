"""Search primitives: RRF by hand, BM25 ranking and scores, exact top-k, metadata filters."""

import math

import numpy as np
import pytest

from rag.search import BM25, metadata_mask, reciprocal_rank_fusion, top_k

DOCS = [
    "The Globe Theatre was built in 1599 by Shakespeare's company on the south bank.",
    "Hamlet, Prince of Denmark, is a tragedy written around 1600.",
    "Stratford-upon-Avon is the market town where Shakespeare was born in 1564.",
    "The sonnets were first printed in 1609 by Thomas Thorpe.",
]


def test_rrf_matches_hand_computed_example():
    dense = [3, 1, 2]  # item 3 ranked first by dense search
    sparse = [1, 4, 3]
    fused = dict(reciprocal_rank_fusion([dense, sparse], k=60))
    expected = {
        3: 1 / 61 + 1 / 63,
        1: 1 / 62 + 1 / 61,
        2: 1 / 63,
        4: 1 / 62,
    }
    assert fused.keys() == expected.keys()
    for item, score in expected.items():
        assert fused[item] == pytest.approx(score, rel=1e-12)
    order = [item for item, _ in reciprocal_rank_fusion([dense, sparse], k=60)]
    assert order == [1, 3, 4, 2]  # 1/61+1/62 > 1/61+1/63 > 1/62 > 1/63


def test_rrf_k_changes_the_weighting():
    fused = reciprocal_rank_fusion([[7, 8]], k=1)
    assert fused == [(7, 1 / 2), (8, 1 / 3)]


def test_bm25_ranks_the_obvious_document_first():
    bm25 = BM25(DOCS)
    for query, best in [
        ("Where was Shakespeare born?", 2),
        ("Who printed the sonnets?", 3),
        ("Hamlet tragedy", 1),
        ("When was the Globe theatre built", 0),
    ]:
        scores = bm25.scores(query)
        assert int(np.argmax(scores)) == best, (query, scores)
    assert not bm25.scores("xylophone quantum").any()


def test_bm25_score_equals_the_formula_on_one_term():
    bm25 = BM25(["cat dog", "dog dog bird", "fish"], k1=1.2, b=0.75)
    avgdl = (2 + 3 + 1) / 3
    idf = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))
    tf, dl = 2, 3
    expected = idf * tf * 2.2 / (tf + 1.2 * (1 - 0.75 + 0.75 * dl / avgdl))
    assert bm25.scores("dog")[1] == pytest.approx(expected, rel=1e-6)


def test_top_k_breaks_ties_by_row_and_respects_the_mask():
    scores = np.array([0.5, 0.9, 0.5, 0.1])
    assert top_k(scores, 3).tolist() == [1, 0, 2]
    mask = np.array([True, False, True, True])
    assert top_k(scores, 2, mask).tolist() == [0, 2]
    assert top_k(scores, 2, np.zeros(4, bool)).tolist() == []


def test_metadata_mask():
    sources = ["/a/x.txt", "/a/y.md", "/b/z.html"]
    assert metadata_mask(sources) is None
    assert metadata_mask(sources, source="/a/y.md").tolist() == [False, True, False]
    assert metadata_mask(sources, contains="/a/").tolist() == [True, True, False]
    assert metadata_mask(sources, source=["/a/x.txt", "/b/z.html"]).tolist() == [True, False, True]
