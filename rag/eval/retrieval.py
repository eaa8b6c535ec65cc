"""Retrieval quality on the Britannica article: recall@1/5/10 and MRR for BM25, dense, hybrid.

  python -m rag.eval.retrieval --index /tmp/britannica_idx [--out results.json]

Builds the index over the article first if DIR has none (~930 chunks of 128 tokens, about 100 s
of embedding on a 2-core CPU). A chunk is relevant to a question when it covers at least half
of the question's gold span (`britannica_qa.json`).

Measured 2026-11-25 (all-MiniLM-L6-v2, chunks of 128 tokens with 24 overlap, 926 chunks, 44
questions; 2-core x86_64 VM, jax 0.10.2 CPU; `rag/eval/results_britannica_2026-11-25.json`):

  mode         R@1     R@5    R@10     MRR
  bm25       0.500   0.750   0.864   0.629
  dense      0.455   0.705   0.705   0.562
  hybrid     0.477   0.795   0.795   0.598

The questions reuse the article's words, which favours BM25; fusion gives the best recall@5,
the depth the answer step reads. One question is 0.023: differences of 1-2 questions are noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Sequence

from rag.index import Index

QA_PATH = pathlib.Path(__file__).with_name("britannica_qa.json")
MODES = ("bm25", "dense", "hybrid")
CUTOFFS = (1, 5, 10)


def find_span(text: str, quote: str) -> tuple[int, int]:
    """Offsets of `quote` in `text`, any run of whitespace matching any other."""
    pattern = r"\s+".join(re.escape(w) for w in quote.split())
    match = re.search(pattern, text)
    if match is None:
        raise ValueError(f"gold quote not found in the article: {quote!r}")
    return match.span()


def load_questions(text: str, path: pathlib.Path = QA_PATH) -> list[tuple[str, tuple[int, int]]]:
    """(question, gold span) pairs; every gold quote must occur in `text`."""
    items = json.loads(path.read_text())["questions"]
    return [(q["question"], find_span(text, q["gold"])) for q in items]


def is_relevant(start: int, end: int, gold: tuple[int, int]) -> bool:
    overlap = min(end, gold[1]) - max(start, gold[0])
    return overlap * 2 >= gold[1] - gold[0]


def evaluate(
    index: Index, source: str, questions: Sequence[tuple[str, tuple[int, int]]]
) -> dict[str, dict[str, float]]:
    """{mode: {"recall@k": ..., "mrr": ...}} over `questions` (MRR counts the first 10 hits)."""
    results = {}
    for mode in MODES:
        ranks = []  # 1-based rank of the first relevant chunk, None if not in the top 10
        for question, gold in questions:
            hits = index.search(question, k=max(CUTOFFS), mode=mode, source=source)
            relevant = [is_relevant(h.chunk.start, h.chunk.end, gold) for h in hits]
            ranks.append(relevant.index(True) + 1 if any(relevant) else None)
        n = len(ranks)
        metrics = {f"recall@{k}": sum(r is not None and r <= k for r in ranks) / n for k in CUTOFFS}
        metrics["mrr"] = sum(1 / r for r in ranks if r is not None) / n
        results[mode] = metrics
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True, help="index dir (built if it has none)")
    parser.add_argument("--out", default=None, help="write the metrics as JSON here")
    args = parser.parse_args(argv)

    from rag.embed import PretrainedEmbedder
    from rag.ingest import read_document
    from train import corpus

    article = corpus.load_britannica_article()
    doc = read_document(article.path, title=article.title)  # as `python -m rag.index` reads it
    questions = load_questions(doc.text)
    with Index.open(args.index, PretrainedEmbedder(), create=True) as index:
        index.update([doc])
        results = evaluate(index, doc.source, questions)
        num_chunks = len(index)
    header = f"{'mode':8s}" + "".join(f"{f'R@{k}':>8s}" for k in CUTOFFS) + f"{'MRR':>8s}"
    print(f"{len(questions)} questions, {num_chunks} chunks, {index.config}")
    print(header)
    for mode, m in results.items():
        print(
            f"{mode:8s}" + "".join(f"{m[f'recall@{k}']:8.3f}" for k in CUTOFFS) + f"{m['mrr']:8.3f}"
        )
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
            "questions": len(questions),
            "chunks": num_chunks,
            "results": results,
        }
        pathlib.Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
