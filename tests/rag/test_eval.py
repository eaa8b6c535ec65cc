"""The eval sets and metrics: spans, acts, relevance, recall/MRR, answer scoring, on a tiny index."""

import json

import pytest
from rag_fakes import FakeEmbedder

from rag.eval import answers, data, retrieval
from rag.eval.data import Query
from rag.index import Index

PLAY = (
    "ACT I.\n\nSCENE I. A heath.\n\nFIRST WITCH.\nWhen shall we three meet again\n"
    "In thunder, lightning, or in rain?\n\nACT II.\n\nMACBETH.\nIs this a dagger which I see "
    "before me,\nThe handle toward my hand?\n\nACT THIRD.\n\nBANQUO.\nThou hast it now.\n"
)


def test_find_spans_ignores_line_wrapping_and_finds_every_occurrence():
    text = "He was baptized in the parish\nchurch of  Stratford. The parish church of Stratford."
    spans = data.find_spans(text, "parish church of Stratford")
    assert [text[s:e] for s, e in spans] == [
        "parish\nchurch of  Stratford",
        "parish church of Stratford",
    ]
    assert data.find_span(text, "parish church of Stratford") == spans[0]
    with pytest.raises(ValueError, match="not found"):
        data.find_span(text, "London")


def test_act_at_reads_roman_arabic_and_word_headings():
    assert data.act_at(PLAY, 0) is None
    assert data.act_at(PLAY, PLAY.index("thunder")) == 1
    assert data.act_at(PLAY, PLAY.index("dagger")) == 2
    assert data.act_at(PLAY, PLAY.index("Thou hast")) == 3
    assert data.act_at("ACT 4\n\nLine.", 8) == 4


def test_known_items_check_play_and_act(tmp_path):
    from rag.ingest import SourceDoc

    plays = {"macbeth": SourceDoc("/m.txt", "Macbeth", PLAY)}
    item = {"query": "a knife before me", "play": "macbeth", "act": 2, "gold": "Is this a dagger"}
    path = tmp_path / "ki.json"
    path.write_text(json.dumps({"queries": [item]}))
    (q,) = data.known_items(plays, path)
    assert q.act == 2 and q.source == "/m.txt" and PLAY[slice(*q.gold[0])] == "Is this a dagger"
    for bad, match in [
        ({"act": 1}, "act"),
        ({"play": "lear"}, "not a play"),
        ({"gold": "xyz"}, "not found"),
    ]:
        path.write_text(json.dumps({"queries": [{**item, **bad}]}))
        with pytest.raises(ValueError, match=match):
            data.known_items(plays, path)


def test_relevance_and_metrics():
    assert retrieval.is_relevant(0, 10, (5, 15))
    assert not retrieval.is_relevant(0, 9, (5, 15))
    assert retrieval.is_relevant(0, 100, (5, 15))
    m = retrieval.metrics([1, 3, None, 12])
    assert m == {"recall@1": 0.25, "recall@5": 0.5, "recall@10": 0.5, "mrr": (1 + 1 / 3) / 4}


def test_evaluate_every_mode_on_a_tiny_index(tmp_path):
    text = "The Globe was built in 1599.\n\nThe sonnets were printed in 1609 by Thomas Thorpe."
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.txt").write_text("Thomas Thorpe also printed other books in London.")
    with Index.open(tmp_path / "idx", FakeEmbedder(), create=True) as index:
        index.add_paths([tmp_path / "a.txt", tmp_path / "b.txt"])
        source = str((tmp_path / "a.txt").resolve())
        q = Query("Who printed the sonnets?", source, (data.find_span(text, "Thomas Thorpe"),))
        results = retrieval.evaluate(index, [q], filter_source=True)
        assert set(results) == set(retrieval.MODES)
        for mode, m in results.items():
            assert m == {"recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0, "mrr": 1.0}, mode
        # A hit in another document never counts, even when its offsets overlap the gold span.
        other = Query(q.text, "/elsewhere.txt", q.gold)
        assert retrieval.evaluate(index, [other], modes=["bm25"])["bm25"]["recall@10"] == 0.0
        with pytest.raises(ValueError, match="mode="):
            retrieval.evaluate(index, [q], modes=["sparse"])
    assert "| hybrid+rerank | 1.000 |" in retrieval.format_table(results)


def test_answer_scoring_rule():
    assert answers.normalize("The 26th of April, 1564!") == ["the", "26th", "of", "april", "1564"]
    assert answers.is_correct("He was baptized on the 26th of April 1564 [1].", ["26th of April"])
    assert answers.is_correct("It cost £60.", ["60"])
    assert not answers.is_correct("In 1560 he left.", ["60"])  # whole words only
    assert not answers.is_correct("In April", ["26th of April"])
    assert answers.is_correct("He married Thomas Quiney", ["Hall", "Quiney"])
    assert not answers.is_correct("anything", [])


def test_evaluate_answers_with_a_stub_model(tmp_path):
    text = "Shakespeare's father was a glover in Stratford.\n\nThe Globe burned in 1613."
    (tmp_path / "a.md").write_text(text)
    seen = []

    def complete(messages):
        seen.append(messages)
        grounded = any("Sources:" in m["content"] for m in messages)
        return "He was a glover [1]." if grounded else "A farmer."

    with Index.open(tmp_path / "idx", FakeEmbedder(), create=True) as index:
        index.add_paths([tmp_path / "a.md"])
        source = index.chunks[0].source
        q = Query("What was the trade of Shakespeare's father?", source, ((0, 10),), ("glover",))
        result = answers.evaluate_answers(index, [q], complete)
        assert result["accuracy_with_retrieval"] == 1.0
        assert result["accuracy_without_retrieval"] == 0.0
        assert result["answers_citing"] == 1 and result["answers_attributed"] == 0
        assert result["named_source_holds_answer"] == 1
        assert seen[1][0]["content"] == answers.CLOSED_BOOK_PROMPT  # no sources closed-book
        with pytest.raises(ValueError, match="no gold answer"):
            answers.evaluate_answers(index, [Query("q", source, ((0, 1),))], complete)


@pytest.mark.data
def test_every_gold_span_is_in_the_corpus():
    from train import corpus

    try:
        article, plays = data.britannica_document(), data.play_documents()
    except corpus.CorpusUnavailable as e:
        pytest.skip(f"corpus unavailable: {e}")
    facts = data.fact_questions(article)  # raises if a gold quote is missing
    known = data.known_items(plays)  # raises if a line is missing or in another act
    assert len(facts) >= 50 and len(known) >= 20
    assert all(q.answers for q in facts)
    for q in facts + known:
        text = article.text if q.source == article.source else None
        text = text or next(p.text for p in plays.values() if p.source == q.source)
        assert all(0 <= s < e <= len(text) for s, e in q.gold)
    assert len({q.text for q in facts + known}) == len(facts) + len(known)
    assert len({q.source for q in known}) >= 15  # spread over the plays
