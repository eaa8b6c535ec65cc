"""Retrieval quality: recall@1/5/10 and MRR for BM25, dense, hybrid and hybrid + rerank.

  python -m rag.eval.retrieval --index runs/rag_corpus [--out results.json]

Builds the index over the whole corpus first if DIR has none (the 42 plays and poems and the
Britannica article, ~19k chunks of 128 tokens: ~15 min of embedding on a 2-core CPU). Two
query sets (`rag/eval/data.py`):
  facts        52 questions on the article, searched with the metadata filter source=article.
  known items  28 paraphrased lines, searched over everything: the hit must be the line itself
               (so the right play and act), among ~19k chunks.
A chunk is relevant when it covers at least half of a gold span. Results: docs/rag.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence

from rag.eval.data import Query
from rag.index import Index
from rag.rerank import WindowReranker

MODES = ("bm25", "dense", "hybrid", "hybrid+rerank")
CUTOFFS = (1, 5, 10)


def is_relevant(start: int, end: int, gold: tuple[int, int]) -> bool:
    overlap = min(end, gold[1]) - max(start, gold[0])
    return overlap * 2 >= gold[1] - gold[0]


def first_relevant_rank(hits, query: Query) -> int | None:
    """1-based rank of the first hit covering a gold span of `query`, None if none does."""
    for rank, hit in enumerate(hits, start=1):
        c = hit.chunk
        if c.source == query.source and any(is_relevant(c.start, c.end, g) for g in query.gold):
            return rank
    return None


def metrics(ranks: Sequence[int | None]) -> dict[str, float]:
    """recall@k for CUTOFFS and MRR (ranks beyond the last cutoff count 0)."""
    n = len(ranks)
    out = {f"recall@{k}": sum(r is not None and r <= k for r in ranks) / n for k in CUTOFFS}
    out["mrr"] = sum(1 / r for r in ranks if r is not None and r <= max(CUTOFFS)) / n
    return out


def evaluate(
    index: Index,
    queries: Sequence[Query],
    *,
    filter_source: bool = False,
    reranker: WindowReranker | None = None,
    modes: Sequence[str] = MODES,
) -> dict[str, dict[str, float]]:
    """{mode: metrics} over `queries`.

    Args:
      index: an index holding the queries' documents.
      queries: the eval queries.
      filter_source: restrict each search to its query's document (the metadata filter).
      reranker: used for "hybrid+rerank" (a `WindowReranker` of the index's embedder if None).
      modes: a subset of MODES.
    """
    results = {}
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}")
        base, _, rerank = mode.partition("+")
        if rerank and reranker is None:
            reranker = WindowReranker(index.embedder)
        ranks = []
        for q in queries:
            hits = index.search(
                q.text,
                k=max(CUTOFFS),
                mode=base,
                source=q.source if filter_source else None,
                reranker=reranker if rerank else None,
            )
            ranks.append(first_relevant_rank(hits, q))
        results[mode] = metrics(ranks)
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| search | R@1 | R@5 | R@10 | MRR |", "|---|---|---|---|---|"]
    for mode, m in results.items():
        cells = "".join(f" {m[f'recall@{k}']:.3f} |" for k in CUTOFFS)
        lines.append(f"| {mode} |{cells} {m['mrr']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True, help="index dir (built if it has none)")
    parser.add_argument("--out", default=None, help="write the metrics as JSON here")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset")
    args = parser.parse_args(argv)

    from rag.embed import PretrainedEmbedder
    from rag.eval import data

    article, plays = data.britannica_document(), data.play_documents()
    modes = args.modes.split(",")
    with Index.open(args.index, PretrainedEmbedder(progress=True), create=True) as index:
        if not len(index):
            index.update([article, *plays.values()])
        index.embedder.progress = False
        # An index of part of the corpus (e.g. an interrupted benchmark build): the sets shrink
        # to the documents it holds, and the output says so.
        indexed = index.documents()
        held = {name: doc for name, doc in plays.items() if doc.source in indexed}
        sets = {
            "facts": (data.fact_questions(article) if article.source in indexed else [], True),
            "known_items": (data.known_items(held, skip_missing=True), False),
        }
        sets = {name: s for name, s in sets.items() if s[0]}
        corpus_note = f"{len(indexed)} of {len(plays) + 1} corpus documents indexed"
        print(corpus_note)
        reranker = WindowReranker(index.embedder)
        results = {}
        for name, (queries, filtered) in sets.items():
            results[name] = evaluate(
                index, queries, filter_source=filtered, reranker=reranker, modes=modes
            )
            print(f"\n{name}: {len(queries)} queries, {len(index)} chunks, {index.config}")
            print(format_table(results[name]))
        num_chunks = len(index)
    if args.out:
        import datetime
        import platform

        import jax

        payload = {
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "jax": jax.__version__,
            "embedder": index.embedder.name,
            "chunk_config": dataclasses.asdict(index.config),
            "chunks": num_chunks,
            "corpus": corpus_note,
            "queries": {name: len(q) for name, (q, _) in sets.items()},
            "reranker": {
                "window": reranker.window,
                "stride": reranker.stride,
                "combine": reranker.combine,
                "depth": 20,
            },
            "results": results,
        }
        pathlib.Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
