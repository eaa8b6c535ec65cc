"""A persistent chunk index: vectors in .npy, chunks in SQLite, a manifest naming the embedder.

Layout of an index directory:
  manifest.json     embedder name and dimension, chunk sizes (written once, atomically)
  chunks.sqlite     documents (source, sha256), chunks (row, source, title, start, end, text),
                    meta (the name of the current vectors file)
  vectors-N.npy     float32 [num_chunks, dim]; row i embeds chunk row i

An update embeds first (the slow part, nothing written yet), writes a new vectors-N+1.npy, then
switches to it in the same SQLite transaction that replaces the chunk rows; a crash anywhere
before that commit leaves the previous index intact, and files left behind are removed on open.

  python -m rag.index --index DIR PATH...
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import sqlite3
from collections.abc import Iterable, Sequence

import numpy as np

from rag import ann
from rag import search as search_lib
from rag.chunking import Chunk, ChunkConfig, chunk_document
from rag.embed import DEFAULT_EMBEDDER, Embedder
from rag.ingest import SourceDoc, read_documents
from rag.rerank import WindowReranker

FORMAT_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (source TEXT PRIMARY KEY, title TEXT, sha256 TEXT);
CREATE TABLE IF NOT EXISTS chunks (
  row INTEGER PRIMARY KEY, source TEXT, title TEXT, start INTEGER, "end" INTEGER, text TEXT);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


class IndexMismatchError(ValueError):
    """The index was built with another embedder (or chunking) than the one given."""


@dataclasses.dataclass(frozen=True)
class Hit:
    """One search result.

    Attributes:
      row: the chunk's row in the index.
      chunk: the chunk (source, title, offsets, text).
      score: the ranking score (RRF for hybrid, cosine for dense, BM25 for bm25).
      dense: cosine similarity of the query and chunk embeddings (the relevance signal).
    """

    row: int
    chunk: Chunk
    score: float
    dense: float


@dataclasses.dataclass(frozen=True)
class UpdateStats:
    added: int  # new sources
    replaced: int  # sources whose text changed
    unchanged: int
    chunks_embedded: int
    total_chunks: int


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(directory: str | os.PathLike) -> dict:
    """The index's manifest.json (embedder name and dim, chunk sizes)."""
    path = pathlib.Path(directory) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no index here (no manifest.json)")
    return json.loads(path.read_text())


class Index:
    """Chunks, their vectors and search over them, stored in one directory (see module doc)."""

    def __init__(
        self,
        directory: pathlib.Path,
        embedder: Embedder,
        config: ChunkConfig,
        dense_backend: str = "auto",
    ):
        self.directory = directory
        self.embedder = embedder
        self.config = config
        self.dense_backend = dense_backend
        self._db = sqlite3.connect(directory / "chunks.sqlite", isolation_level=None)
        self._db.executescript(_SCHEMA)
        self._load()

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike,
        embedder: Embedder,
        *,
        create: bool = False,
        config: ChunkConfig | None = None,
        dense_backend: str = "auto",
    ) -> Index:
        """Opens (or with `create`, creates) the index in `directory`.

        Args:
          directory: the index directory.
          embedder: must have the name and dimension the index was built with.
          create: create an empty index when the directory has none.
          config: chunk sizes; None takes the index's (or the defaults for a new index).
          dense_backend: "exact", "hnsw" (faiss, built in memory on first search) or "auto"
            (`rag.ann.make_dense_search`).

        Raises:
          FileNotFoundError: no index there and not `create`.
          IndexMismatchError: built with another embedder, dimension or chunk config.
        """
        ann.make_dense_search(np.zeros((0, 1), np.float32), dense_backend)  # validates the name
        directory = pathlib.Path(directory)
        manifest_path = directory / "manifest.json"
        if not manifest_path.exists():
            if not create:
                raise FileNotFoundError(f"{directory}: no index here (no manifest.json)")
            directory.mkdir(parents=True, exist_ok=True)
            config = config or ChunkConfig()
            if config.chunk_size > embedder.max_tokens:
                raise ValueError(
                    f"chunk_size={config.chunk_size} exceeds what {embedder.name} reads "
                    f"({embedder.max_tokens} tokens)"
                )
            manifest = {
                "format": FORMAT_VERSION,
                "embedder": embedder.name,
                "dim": int(embedder.dim),
                "chunk_size": config.chunk_size,
                "overlap": config.overlap,
            }
            _atomic_write(manifest_path, json.dumps(manifest, indent=2).encode() + b"\n")
        manifest = read_manifest(directory)
        if manifest.get("format") != FORMAT_VERSION:
            raise IndexMismatchError(
                f"{directory}: index format {manifest.get('format')}, expected {FORMAT_VERSION}"
            )
        if manifest["embedder"] != embedder.name or manifest["dim"] != int(embedder.dim):
            raise IndexMismatchError(
                f"{directory} was built with embedder {manifest['embedder']!r} "
                f"(dim {manifest['dim']}), but {embedder.name!r} (dim {embedder.dim}) was given; "
                f"open it with {manifest['embedder']!r} or build a new index"
            )
        stored = ChunkConfig(manifest["chunk_size"], manifest["overlap"])
        if config is not None and config != stored:
            raise IndexMismatchError(
                f"{directory} was chunked with {stored}, but {config} was requested"
            )
        return cls(directory, embedder, stored, dense_backend)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- reading ---

    def _load(self) -> None:
        rows = self._db.execute(
            'SELECT row, source, title, start, "end", text FROM chunks ORDER BY row'
        ).fetchall()
        if any(r[0] != i for i, r in enumerate(rows)):
            raise RuntimeError(f"{self.directory}: chunk rows are not 0..n-1; rebuild the index")
        self.chunks = [Chunk(*r[1:]) for r in rows]
        name = self._vectors_name()
        if name is None:
            self.vectors = np.zeros((0, self.embedder.dim), np.float32)
        else:
            self.vectors = np.load(self.directory / name)
        if self.vectors.shape != (len(self.chunks), self.embedder.dim):
            raise RuntimeError(
                f"{self.directory}: {name} has shape {self.vectors.shape}, expected "
                f"({len(self.chunks)}, {self.embedder.dim}); rebuild the index"
            )
        for path in self.directory.glob("vectors-*"):  # leftovers of an interrupted update
            if path.name != name:
                path.unlink(missing_ok=True)
        for cached in ("bm25", "sources", "dense_search"):
            self.__dict__.pop(cached, None)

    def _vectors_name(self) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'vectors'").fetchone()
        return row[0] if row else None

    def documents(self) -> dict[str, str]:
        """source -> sha256 of its text, for every ingested document."""
        return dict(self._db.execute("SELECT source, sha256 FROM documents").fetchall())

    @functools.cached_property
    def bm25(self) -> search_lib.BM25:
        return search_lib.BM25([c.text for c in self.chunks])

    @functools.cached_property
    def dense_search(self) -> ann.DenseSearch:
        return ann.make_dense_search(self.vectors, self.dense_backend)

    @functools.cached_property
    def sources(self) -> list[str]:
        return [c.source for c in self.chunks]

    def __len__(self) -> int:
        return len(self.chunks)

    # --- writing ---

    def update(self, docs: Iterable[SourceDoc]) -> UpdateStats:
        """Adds new documents and replaces the chunks of changed ones (same source, new text)."""
        known = self.documents()
        added, replaced, unchanged = [], [], 0
        for doc in {d.source: d for d in docs}.values():  # a source given twice: the last wins
            if doc.source not in known:
                added.append(doc)
            elif known[doc.source] != doc.sha256:
                replaced.append(doc)
            else:
                unchanged += 1
        changed = added + replaced
        if not changed:
            return UpdateStats(0, 0, unchanged, 0, len(self.chunks))
        new_chunks = [
            c for d in changed for c in chunk_document(d, self.embedder.count_tokens, self.config)
        ]
        new_vectors = self._embed([c.text for c in new_chunks])
        gone = {d.source for d in changed}
        keep = [i for i, c in enumerate(self.chunks) if c.source not in gone]
        chunks = [self.chunks[i] for i in keep] + new_chunks
        vectors = np.concatenate([self.vectors[keep], new_vectors]).astype(np.float32)
        self._write(chunks, vectors, changed)
        return UpdateStats(len(added), len(replaced), unchanged, len(new_chunks), len(chunks))

    def add_paths(self, paths: Iterable[str | os.PathLike]) -> UpdateStats:
        """Reads files / directories (`rag.ingest.read_documents`) and `update`s with them."""
        return self.update(read_documents(paths))

    def remove(self, sources: Iterable[str]) -> int:
        """Drops every chunk of `sources`; returns how many chunks went."""
        gone = set(sources)
        keep = [i for i, c in enumerate(self.chunks) if c.source not in gone]
        removed = len(self.chunks) - len(keep)
        self._write([self.chunks[i] for i in keep], self.vectors[keep], [], removed=gone)
        return removed

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.embedder.dim), np.float32)
        vectors = np.asarray(self.embedder.embed(texts), np.float32)
        if vectors.shape != (len(texts), self.embedder.dim):
            raise ValueError(
                f"{self.embedder.name}.embed returned shape {vectors.shape}, "
                f"expected ({len(texts)}, {self.embedder.dim})"
            )
        return vectors

    def _write(
        self,
        chunks: list[Chunk],
        vectors: np.ndarray,
        docs: list[SourceDoc],
        removed: set[str] = frozenset(),
    ) -> None:
        old = self._vectors_name()
        version = int(old[len("vectors-") : -len(".npy")]) + 1 if old else 1
        name = f"vectors-{version}.npy"
        tmp = self.directory / (name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, vectors)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / name)
        self._commit(chunks, docs, removed, name)
        if old:
            (self.directory / old).unlink(missing_ok=True)
        self._load()

    def _commit(
        self, chunks: list[Chunk], docs: list[SourceDoc], removed: set[str], vectors_name: str
    ) -> None:
        """Replaces all chunk rows and points at the new vectors file in one transaction."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM chunks")
            db.executemany(
                'INSERT INTO chunks (row, source, title, start, "end", text) '
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(i, c.source, c.title, c.start, c.end, c.text) for i, c in enumerate(chunks)],
            )
            db.executemany(
                "INSERT OR REPLACE INTO documents (source, title, sha256) VALUES (?, ?, ?)",
                [(d.source, d.title, d.sha256) for d in docs],
            )
            db.executemany("DELETE FROM documents WHERE source = ?", [(s,) for s in removed])
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('vectors', ?)", (vectors_name,)
            )
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    # --- search ---

    def search(
        self,
        query: str,
        k: int = 5,
        *,
        mode: str = "hybrid",
        source: str | Sequence[str] | None = None,
        source_contains: str | None = None,
        candidates: int = 50,
        rrf_k: int = 60,
        reranker: WindowReranker | None = None,
        rerank_depth: int = 20,
    ) -> list[Hit]:
        """Top-k chunks for `query`.

        Args:
          query: the question or keywords.
          k: number of results.
          mode: "hybrid" (RRF of dense and BM25), "dense" (cosine; exact or HNSW, see
            `dense_backend`) or "bm25".
          source / source_contains: metadata filters on the chunk's source path.
          candidates: how many of each ranking enter the fusion.
          rrf_k: the RRF constant.
          reranker: re-scores the first `rerank_depth` results of `mode` (`rag.rerank`).
          rerank_depth: how many first-stage results the reranker sees.

        Returns:
          Hits, best first; each carries its dense similarity whatever the mode.
        """
        if mode not in ("hybrid", "dense", "bm25"):
            raise ValueError(f"mode={mode!r} is not one of 'hybrid', 'dense', 'bm25'")
        if not self.chunks:
            return []
        mask = search_lib.metadata_mask(self.sources, source, source_contains)
        query_vector = self._embed([query])[0]
        depth = max(k, rerank_depth) if reranker is not None else k
        if mode == "dense":
            rows = self.dense_search.search(query_vector, depth, mask)
            scored = [(int(r), float(self.vectors[r] @ query_vector)) for r in rows]
        elif mode == "bm25":
            scores = self.bm25.scores(query)
            rows = search_lib.bm25_ranking(self.bm25, query, depth, mask)
            scored = [(int(r), float(scores[r])) for r in rows]
        else:
            dense_rows = self.dense_search.search(query_vector, candidates, mask)
            bm25_rows = search_lib.bm25_ranking(self.bm25, query, candidates, mask)
            fused = search_lib.reciprocal_rank_fusion([dense_rows, bm25_rows], k=rrf_k)
            scored = fused[:depth]
        hits = [Hit(r, self.chunks[r], s, float(self.vectors[r] @ query_vector)) for r, s in scored]
        if reranker is not None:
            hits = reranker.rerank(query_vector, hits)
        return hits[:k]


def build_index(
    directory: str | os.PathLike,
    paths: Sequence[str | os.PathLike],
    embedder: Embedder,
    config: ChunkConfig | None = None,
) -> UpdateStats:
    """Creates or updates the index in `directory` with the files under `paths`."""
    with Index.open(directory, embedder, create=True, config=config) as index:
        return index.add_paths(paths)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build or update a RAG index.")
    parser.add_argument("--index", required=True, help="the index directory")
    parser.add_argument("paths", nargs="+", help=".txt/.md/.html files or directories")
    parser.add_argument("--embedder", default=DEFAULT_EMBEDDER)
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens (new index only)")
    parser.add_argument("--overlap", type=int, default=None, help="tokens (new index only)")
    args = parser.parse_args(argv)
    from rag.embed import PretrainedEmbedder

    config = None
    if args.chunk_size is not None or args.overlap is not None:
        size = ChunkConfig().chunk_size if args.chunk_size is None else args.chunk_size
        # Without --overlap, keep the default's ratio (24 of 128 tokens).
        overlap = size * ChunkConfig().overlap // ChunkConfig().chunk_size
        config = ChunkConfig(size, overlap if args.overlap is None else args.overlap)
    stats = build_index(args.index, args.paths, PretrainedEmbedder(args.embedder), config)
    print(
        f"{args.index}: {stats.added} added, {stats.replaced} replaced, {stats.unchanged} "
        f"unchanged; {stats.chunks_embedded} chunks embedded, {stats.total_chunks} in the index"
    )


if __name__ == "__main__":
    main()
