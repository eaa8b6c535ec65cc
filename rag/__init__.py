"""Retrieval-augmented generation: ingest, chunk, embed, hybrid search, grounded answers.

ingest.py   files -> SourceDoc      chunking.py  SourceDoc -> Chunks with exact offsets
embed.py    the Embedder interface  search.py    BM25, exact top-k, RRF, metadata filters
ann.py      exact / faiss HNSW      rerank.py    sentence-window reranking of the fused top-k
index.py    persistent index + CLI  answer.py    grounded answers, citations, server helpers
api.py      notebook entry points   ask.py       CLI; docs/rag.md has the measured results
eval/       eval sets, retrieval metrics (recall@k, MRR) and end-to-end answer accuracy
"""
