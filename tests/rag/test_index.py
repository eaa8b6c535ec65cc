"""The persistent index: round trip, re-ingest replaces, wrong embedder, crash safety, search."""

import numpy as np
import pytest
from rag_fakes import FakeEmbedder

from rag import index as index_lib
from rag.chunking import ChunkConfig
from rag.index import Index, IndexMismatchError, build_index

CONFIG = ChunkConfig(24, 6)
GLOBE = (
    "The Globe Theatre was built in 1599 by the Lord Chamberlain's Men. It burned down in 1613 "
    "during a performance of Henry VIII. A new Globe opened on the same site in 1614.\n\n"
    "The theatre was closed by the Puritans in 1642 and pulled down soon after."
)
SONNETS = (
    "The sonnets were first printed in 1609 by Thomas Thorpe. They are dedicated to a "
    "mysterious Mr. W. H.\n\nThere are 154 sonnets; most are addressed to a young man."
)


@pytest.fixture
def corpus_dir(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "globe.txt").write_text(GLOBE)
    (d / "sonnets.md").write_text("# Sonnets\n\n" + SONNETS)
    return d


def test_round_trip(corpus_dir, tmp_path, fake_embedder):
    stats = build_index(tmp_path / "idx", [corpus_dir], fake_embedder, CONFIG)
    assert (stats.added, stats.replaced, stats.unchanged) == (2, 0, 0)
    with Index.open(tmp_path / "idx", fake_embedder) as built:
        chunks, vectors = built.chunks, built.vectors.copy()
        hits = built.search("it burned down in 1613", k=3)
    assert stats.total_chunks == len(chunks) > 4
    with Index.open(tmp_path / "idx", FakeEmbedder()) as reopened:
        assert reopened.config == CONFIG
        assert reopened.chunks == chunks
        np.testing.assert_array_equal(reopened.vectors, vectors)
        assert reopened.search("it burned down in 1613", k=3) == hits
    for c in chunks:  # offsets index the source text
        text = GLOBE if c.source.endswith("globe.txt") else "# Sonnets\n\n" + SONNETS
        assert text[c.start : c.end] == c.text
    assert hits[0].chunk.source.endswith("globe.txt") and "1613" in hits[0].chunk.text


def test_reingest_replaces_changed_file_and_skips_unchanged(corpus_dir, tmp_path, fake_embedder):
    build_index(tmp_path / "idx", [corpus_dir], fake_embedder, CONFIG)
    with Index.open(tmp_path / "idx", fake_embedder) as index:
        sonnets_before = [c for c in index.chunks if c.source.endswith("sonnets.md")]
        (corpus_dir / "globe.txt").write_text("The Rose was a rival playhouse built in 1587.")
        fake_embedder.calls.clear()
        stats = index.add_paths([corpus_dir])
        assert (stats.added, stats.replaced, stats.unchanged) == (0, 1, 1)
        assert fake_embedder.calls == [stats.chunks_embedded]  # only the changed file
        globe = [c for c in index.chunks if c.source.endswith("globe.txt")]
        assert [c.text for c in globe] == ["The Rose was a rival playhouse built in 1587."]
        assert [c for c in index.chunks if c.source.endswith("sonnets.md")] == sonnets_before
        assert len(index.vectors) == len(index.chunks)
        # The vectors still belong to their chunks after the rows moved.
        np.testing.assert_allclose(
            index.vectors, fake_embedder.embed([c.text for c in index.chunks]), atol=1e-6
        )
        assert index.add_paths([corpus_dir]).chunks_embedded == 0
    with Index.open(tmp_path / "idx", fake_embedder) as index:
        assert not any("1613" in c.text for c in index.chunks)
        assert len(list((tmp_path / "idx").glob("vectors-*"))) == 1


def test_wrong_embedder_is_a_clear_error(corpus_dir, tmp_path, fake_embedder):
    build_index(tmp_path / "idx", [corpus_dir], fake_embedder, CONFIG)
    with pytest.raises(IndexMismatchError, match="built with embedder 'fake-bow'"):
        Index.open(tmp_path / "idx", FakeEmbedder(name="other-model"))
    with pytest.raises(IndexMismatchError, match="dim 64"):
        Index.open(tmp_path / "idx", FakeEmbedder(dim=32))
    with pytest.raises(IndexMismatchError, match="chunked with"):
        Index.open(tmp_path / "idx", fake_embedder, config=ChunkConfig(48, 6))
    with pytest.raises(FileNotFoundError, match="no index here"):
        Index.open(tmp_path / "nothing", fake_embedder)


@pytest.mark.parametrize("crash_in", ["embed", "commit"])
def test_crash_mid_ingest_leaves_previous_index_usable(
    crash_in, corpus_dir, tmp_path, fake_embedder, monkeypatch
):
    build_index(tmp_path / "idx", [corpus_dir], fake_embedder, CONFIG)
    with Index.open(tmp_path / "idx", fake_embedder) as index:
        before = index.chunks
    (corpus_dir / "globe.txt").write_text("Completely new text about the Swan theatre.")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash")

    if crash_in == "embed":
        monkeypatch.setattr(fake_embedder, "embed", crash)
    else:  # the new vectors file is written, the SQLite switch to it is not
        monkeypatch.setattr(index_lib.Index, "_commit", crash)
    with pytest.raises(KeyboardInterrupt):
        build_index(tmp_path / "idx", [corpus_dir], fake_embedder)
    monkeypatch.undo()
    with Index.open(tmp_path / "idx", FakeEmbedder()) as index:
        assert index.chunks == before
        assert len(index.vectors) == len(before)
        assert len(list((tmp_path / "idx").glob("vectors-*"))) == 1  # leftovers removed
        assert index.add_paths([corpus_dir]).replaced == 1  # and the update can be redone


def test_search_modes_filters_and_remove(corpus_dir, tmp_path, fake_embedder):
    build_index(tmp_path / "idx", [corpus_dir], fake_embedder, CONFIG)
    with Index.open(tmp_path / "idx", fake_embedder) as index:
        for mode in ("hybrid", "dense", "bm25"):
            hits = index.search("Thomas Thorpe printed the sonnets", k=2, mode=mode)
            assert "Thorpe" in hits[0].chunk.text, mode
            assert all(-1.0 - 1e-5 <= h.dense <= 1.0 + 1e-5 for h in hits)
        globe = next(c.source for c in index.chunks if c.source.endswith("globe.txt"))
        hits = index.search("Thomas Thorpe printed the sonnets", k=3, source=globe)
        assert hits and all(h.chunk.source == globe for h in hits)
        assert index.search("sonnets", k=3, mode="bm25", source_contains="globe") == []
        with pytest.raises(ValueError, match="mode="):
            index.search("x", mode="sparse")
        removed = index.remove([globe])
        assert removed > 0 and all(c.source != globe for c in index.chunks)
        assert globe not in index.documents()
