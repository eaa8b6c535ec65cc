"""The few calls a notebook needs: open or build an index with the embedder it names, and ask.

from rag.api import open_index, load_chat_model
index = open_index("runs/idx", paths=["notes/"])     # builds or updates, then opens
index.search("When was the Globe built?", k=5)        # -> [Hit]
answer("When was the Globe built?", index, load_chat_model())  # rag.answer.answer
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from rag.answer import Completer, chat_completer
from rag.chunking import ChunkConfig
from rag.embed import DEFAULT_EMBEDDER, Embedder
from rag.index import Index, read_manifest
from rag.ingest import SourceDoc


def open_index(
    directory: str | os.PathLike,
    paths: Sequence[str | os.PathLike] = (),
    docs: Sequence[SourceDoc] = (),
    *,
    embedder: Embedder | None = None,
    config: ChunkConfig | None = None,
    dense_backend: str = "auto",
) -> Index:
    """Opens the index in `directory`, creating it and adding `paths` / `docs` when given.

    Args:
      directory: the index directory.
      paths: files or directories to ingest (only new or changed ones are embedded).
      docs: already-read documents to ingest.
      embedder: None loads the one the index was built with (or all-MiniLM-L6-v2 for a new one).
      config: chunk sizes of a new index.
      dense_backend: "auto", "exact" or "hnsw" (`rag.ann`).

    Returns:
      The open index; close it (or use `with`) when done.
    """
    if embedder is None:
        from rag.embed import PretrainedEmbedder

        try:
            name = read_manifest(directory)["embedder"]
        except FileNotFoundError:
            name = DEFAULT_EMBEDDER
        embedder = PretrainedEmbedder(name)
    create = bool(paths or docs)
    index = Index.open(
        directory, embedder, create=create, config=config, dense_backend=dense_backend
    )
    if paths:
        index.add_paths(paths)
    if docs:
        index.update(docs)
    return index


def load_chat_model(name: str = "smollm2-135m-instruct", max_tokens: int = 96) -> Completer:
    """A greedy `complete(messages) -> str` for `rag.answer.answer` from a registry model."""
    from models import load_pretrained

    return chat_completer(load_pretrained(name), max_tokens=max_tokens)
