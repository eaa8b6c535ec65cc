"""The notebook API: open_index builds, updates and reopens; the embedder comes from the manifest."""

import pytest
from rag_fakes import FakeEmbedder

from rag import api, embed
from rag.chunking import ChunkConfig
from rag.ingest import SourceDoc


def test_open_index_builds_updates_and_reopens(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("The Globe Theatre was built in 1599 on Bankside.")
    made = []
    monkeypatch.setattr(
        embed, "PretrainedEmbedder", lambda name: made.append(name) or FakeEmbedder()
    )
    with pytest.raises(FileNotFoundError, match="no index here"):
        api.open_index(tmp_path / "idx")
    assert made == ["all-minilm-l6-v2"]  # the default, for a directory with no manifest yet
    doc = SourceDoc("/mem/b.txt", "b", "The sonnets were printed in 1609.")
    with api.open_index(
        tmp_path / "idx", [tmp_path / "a.txt"], [doc], config=ChunkConfig(16, 2)
    ) as index:
        assert {c.source for c in index.chunks} == {
            str((tmp_path / "a.txt").resolve()),
            "/mem/b.txt",
        }
    with api.open_index(tmp_path / "idx", dense_backend="hnsw") as index:
        assert made[-1] == "fake-bow"  # the name recorded in the manifest
        assert index.search("sonnets printed", 1, mode="dense")[0].chunk.source == "/mem/b.txt"
