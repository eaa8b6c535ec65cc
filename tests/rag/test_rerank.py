"""The sentence-window reranker: windows, promotion of the chunk with the matching sentence, cache."""

import numpy as np
import pytest
from rag_fakes import FakeEmbedder

from rag.chunking import Chunk
from rag.index import Hit
from rag.rerank import WindowReranker, sentence_windows


def test_sentence_windows():
    text = "One fish. Two fish; red fish! Blue fish? The end"
    assert sentence_windows(text, 2) == [
        "One fish. Two fish;",
        "Two fish; red fish!",
        "red fish! Blue fish?",
        "Blue fish? The end",
    ]
    assert sentence_windows(text, 2, stride=2) == [
        "One fish. Two fish;",
        "red fish! Blue fish?",
        "Blue fish? The end",
    ]
    assert sentence_windows(text, 10) == ["One fish. Two fish; red fish! Blue fish? The end"]
    assert sentence_windows("no boundary here", 1) == ["no boundary here"]
    with pytest.raises(ValueError, match="window=0 and stride=1"):
        sentence_windows(text, 0)


def _hits(texts):
    return [
        Hit(i, Chunk("/s.txt", "t", 0, len(t), t), score=1.0 / (i + 1), dense=0.0)
        for i, t in enumerate(texts)
    ]


FILLER = " ".join(f"Filler sentence {i} about stage directions." for i in range(8))
TEXTS = [
    FILLER + " Stratford market town.",  # first-stage winner: mentions one query word
    FILLER + " The dagger handle points toward my hand.",  # one sentence matches the query
    "Nothing relevant at all. Just words.",
]


def test_window_reranker_promotes_the_chunk_whose_sentence_matches():
    embedder = FakeEmbedder()
    query = embedder.embed(["the dagger handle toward my hand"])[0]
    hits = _hits(TEXTS)
    by_max = WindowReranker(embedder, window=1, combine="max").rerank(query, hits)
    assert [h.row for h in by_max][0] == 1
    assert by_max[0].score == pytest.approx(
        float(np.max(embedder.embed(sentence_windows(TEXTS[1], 1)) @ query))
    )
    fused = WindowReranker(embedder, window=1, combine="rrf").rerank(query, hits)
    assert {h.row for h in fused} == {0, 1, 2} and fused[-1].row == 2
    assert fused[0].score == pytest.approx(1 / 61 + 1 / 62)  # rank 2 then 1 (or 1 then 2)
    assert WindowReranker(embedder).rerank(query, []) == []
    with pytest.raises(ValueError, match="combine="):
        WindowReranker(embedder, combine="mean")


def test_window_vectors_are_cached_per_chunk_text():
    embedder = FakeEmbedder()
    reranker = WindowReranker(embedder, window=2)
    query = embedder.embed(["x"])[0]
    embedder.calls.clear()
    reranker.rerank(query, _hits(TEXTS))
    reranker.rerank(query, _hits(TEXTS[:2]))
    assert len(embedder.calls) == 1  # the second call embedded nothing new
