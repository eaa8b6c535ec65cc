"""Retrieval-augmented generation: ingest, chunk, embed, hybrid search, grounded answers.

ingest.py   files -> SourceDoc      chunking.py  SourceDoc -> Chunks with exact offsets
embed.py    the Embedder interface  search.py    exact dense, BM25, RRF, filters
index.py    persistent index + CLI  answer.py    grounded answers with citations; ask.py CLI
eval/       retrieval evaluation on the Britannica article (recall@k, MRR)
"""
