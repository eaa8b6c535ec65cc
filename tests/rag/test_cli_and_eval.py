"""The two CLIs (with the fake embedder and a stub model patched in) and the eval helpers."""

import json

import pytest
from rag_fakes import FakeEmbedder

import models
from rag import answer as answer_lib
from rag import ask, embed
from rag import index as index_lib
from rag.eval import retrieval
from rag.index import Index


@pytest.fixture
def fake_models(monkeypatch):
    monkeypatch.setattr(embed, "PretrainedEmbedder", lambda *a, **kw: FakeEmbedder())
    monkeypatch.setattr(models, "load_pretrained", lambda name: f"model {name}")
    replies = []

    def completer(lm, max_tokens):
        def complete(messages):
            replies.append(messages)
            return "It was built in 1599 [1] [4]."

        return complete

    monkeypatch.setattr(ask, "chat_completer", completer)
    return replies


def test_index_and_ask_cli(tmp_path, capsys, fake_models):
    doc = tmp_path / "globe.md"
    doc.write_text("# Globe\n\nThe Globe Theatre was built in 1599 on Bankside.")
    index_lib.main(["--index", str(tmp_path / "idx"), str(doc), "--chunk-size", "16"])
    assert "1 added, 0 replaced" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["embedder"] == "fake-bow" and manifest["chunk_size"] == 16
    index_lib.main(["--index", str(tmp_path / "idx"), str(doc)])
    assert "0 added, 0 replaced, 1 unchanged" in capsys.readouterr().out

    ask.main(
        ["--index", str(tmp_path / "idx"), "When was the Globe built?", "--min-similarity", "0"]
    )
    out = capsys.readouterr().out
    assert out.startswith("It was built in 1599 [1].")  # [4] was not retrieved: dropped
    assert f"[1] {doc.resolve()} [" in out
    assert len(fake_models) == 1


def test_find_span_ignores_line_wrapping():
    text = "He was baptized in the parish\nchurch of  Stratford on the 26th."
    start, end = retrieval.find_span(text, "parish church of Stratford")
    assert text[start:end] == "parish\nchurch of  Stratford"
    with pytest.raises(ValueError, match="not found"):
        retrieval.find_span(text, "London")


def test_relevance_needs_half_the_gold_span():
    assert retrieval.is_relevant(0, 10, (5, 15))
    assert not retrieval.is_relevant(0, 9, (5, 15))
    assert retrieval.is_relevant(0, 100, (5, 15))


def test_evaluate_on_a_tiny_index(tmp_path, fake_embedder):
    text = "The Globe was built in 1599.\n\nThe sonnets were printed in 1609 by Thomas Thorpe."
    (tmp_path / "a.txt").write_text(text)
    with Index.open(tmp_path / "idx", fake_embedder, create=True) as index:
        index.add_paths([tmp_path / "a.txt"])
        source = index.chunks[0].source
        questions = [("Who printed the sonnets?", retrieval.find_span(text, "Thomas Thorpe"))]
        results = retrieval.evaluate(index, source, questions)
    assert set(results) == set(retrieval.MODES)
    assert results["bm25"] == {"recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0, "mrr": 1.0}


@pytest.mark.data
def test_every_gold_quote_is_in_the_article():
    from rag.ingest import read_document
    from train import corpus

    try:
        article = corpus.load_britannica_article()
    except corpus.CorpusUnavailable as e:
        pytest.skip(f"corpus unavailable: {e}")
    questions = retrieval.load_questions(read_document(article.path).text)
    assert len(questions) >= 40
    assert len({q for q, _ in questions}) == len(questions)


def test_answer_module_defaults_are_sane():
    assert 0 < answer_lib.MIN_SIMILARITY < 1
