"""Ingest and chunking: offsets map back to the exact source text, sizes hold, HTML is text."""

import re

import pytest
from rag_fakes import FakeEmbedder

from rag.chunking import ChunkConfig, chunk_document, split_text
from rag.ingest import html_to_text, read_document, read_documents

count = FakeEmbedder().count_tokens

SAMPLE = (
    "# Notes on the plays\n\n"
    "Hamlet is a tragedy. It was written around 1600!  Is it the longest play? Yes.\n"
    "A second line of the same paragraph, with commas, clauses; and more words: many.\n\n\n"
    + " ".join(f"Sentence number {i} says something about act {i % 5}." for i in range(60))
    + "\n\n"
    + "x" * 3000  # one 'word' longer than any chunk: cut in halves
    + "\n\n   Trailing paragraph after spaces.   \n"
)


def check_chunks(text, spans, config, counter=count):
    for start, end in spans:
        piece = text[start:end]
        assert piece == piece.strip() and piece
        assert counter(piece) <= config.chunk_size
    # Together the chunks cover every non-space character.
    covered = [False] * len(text)
    for start, end in spans:
        covered[start:end] = [True] * (end - start)
    assert all(c or text[i].isspace() for i, c in enumerate(covered))
    starts = [s for s, _ in spans]
    assert starts == sorted(starts)


@pytest.mark.parametrize("size,overlap", [(16, 0), (32, 8), (128, 24)])
def test_chunk_offsets_are_exact_and_sizes_hold(size, overlap, tmp_path):
    path = tmp_path / "notes.md"
    path.write_text(SAMPLE)
    doc = read_document(path)
    assert doc.title == "Notes on the plays"
    config = ChunkConfig(size, overlap)
    chunks = chunk_document(doc, count, config)
    assert len(chunks) > 3
    for c in chunks:
        assert doc.text[c.start : c.end] == c.text
        assert c.source == str(path.resolve()) and c.title == doc.title
    check_chunks(doc.text, [(c.start, c.end) for c in chunks], config)
    if overlap:
        assert any(b.start < a.end for a, b in zip(chunks, chunks[1:], strict=False))


def test_chunks_end_at_sentence_boundaries():
    text = " ".join(f"Sentence number {i} says something about act {i % 5}." for i in range(40))
    spans = split_text(text, count, ChunkConfig(40, 10))
    assert len(spans) > 5
    for start, end in spans:
        assert text[end - 1] == "." and (start == 0 or text[start - 2] == ".")


def test_empty_and_whitespace_text_have_no_chunks():
    assert split_text("", count) == []
    assert split_text(" \n\n  ", count) == []


def test_bad_config_is_an_error():
    with pytest.raises(ValueError, match="overlap"):
        ChunkConfig(32, 30)


def test_html_text_title_and_offsets(tmp_path):
    page = (
        "<html><head><title>Globe &amp; Theatre</title><style>p {color: red}</style></head>"
        "<body><h1>The Globe</h1><p>Built in   1599 by\nthe company.</p>"
        "<script>var x = 1;</script><ul><li>First</li><li>Second &lt;b&gt;</li></ul></body></html>"
    )
    text, title = html_to_text(page)
    assert title == "Globe & Theatre"
    assert text == "The Globe\n\nBuilt in 1599 by the company.\n\nFirst\n\nSecond <b>"
    path = tmp_path / "globe.html"
    path.write_text(page)
    doc = read_document(path)
    assert doc.text == text
    chunks = chunk_document(doc, count, ChunkConfig(8, 2))
    assert all(doc.text[c.start : c.end] == c.text for c in chunks)
    assert "color" not in doc.text and "var" not in doc.text


def test_directory_and_unsupported_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub" / "b.md").write_text("## Bee\nbeta")
    (tmp_path / "c.pdf").write_bytes(b"%PDF")
    docs = read_documents([tmp_path])
    assert [d.title for d in docs] == ["a", "Bee"]
    with pytest.raises(ValueError, match="unsupported file type"):
        read_document(tmp_path / "c.pdf")
    with pytest.raises(FileNotFoundError):
        read_documents([tmp_path / "missing"])


@pytest.mark.data
def test_britannica_chunks_with_the_real_tokenizer():
    from models import load_pretrained
    from train import corpus

    try:
        article = corpus.load_britannica_article()
    except corpus.CorpusUnavailable as e:
        pytest.skip(f"corpus unavailable: {e}")
    tokenizer = load_pretrained("all-minilm-l6-v2").tokenizer
    text = article.text[:60_000]

    def real_count(s):
        return len(tokenizer.encode(s))

    config = ChunkConfig(128, 24)
    spans = split_text(text, real_count, config)
    check_chunks(text, spans, config, real_count)
    # Most chunks are well filled, not fragments.
    sizes = [real_count(text[s:e]) for s, e in spans]
    assert sum(sizes) / len(sizes) > 80
    assert all(re.search(r"\S", text[s:e]) for s, e in spans)
