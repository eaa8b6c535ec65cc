"""Grounded answers: citations always refer to retrieved chunks; the no-source path; end to end."""

import json
import random

import pytest
from rag_fakes import FakeEmbedder

from rag.answer import (
    ANSWER_PREFIX,
    NO_ANSWER,
    NO_SOURCES_PROMPT,
    SYSTEM_PROMPT,
    answer,
    attribute,
    augment_messages,
    build_messages,
    cut_source_echo,
    format_answer,
    render_sources,
    resolve_citations,
)
from rag.chunking import ChunkConfig
from rag.index import Index

DOC = (
    "Shakespeare was baptized at Stratford-upon-Avon on the 26th of April 1564. "
    "His father, John Shakespeare, was a glover and a burgess of Stratford. "
    "In 1582 he married Anne Hathaway, who was eight years older than he was. "
    "The Globe Theatre was built in 1599 on the south bank of the Thames."
)


@pytest.fixture
def index(tmp_path):
    (tmp_path / "bio.txt").write_text(DOC)
    with Index.open(tmp_path / "idx", FakeEmbedder(), create=True, config=ChunkConfig(20, 4)) as ix:
        ix.add_paths([tmp_path / "bio.txt"])
        yield ix


class StubModel:
    """Records the prompt and replies with a fixed text."""

    def __init__(self, reply: str):
        self.reply, self.messages = reply, None

    def __call__(self, messages):
        self.messages = messages
        return self.reply


def test_resolve_citations_drops_unknown_numbers():
    text, cited, dropped = resolve_citations("Paris [1][7] and Rome [2, 9]. Nowhere [0].", 3)
    assert cited == [1, 2] and dropped == [7, 9, 0]
    assert text == "Paris [1] and Rome [2]. Nowhere."


def test_citations_resolve_to_the_numbered_sources(index):
    model = StubModel("1], he was baptized in 1564, married in 1582 [2] [5].")
    result = answer(
        "When was Shakespeare baptized?", index, model, k=3, min_similarity=0.0,
        answer_prefix=ANSWER_PREFIX,
    )  # fmt: skip
    assert len(result.sources) == 3 and result.dropped == [5] and result.attributed is None
    # The reply is prefilled with ANSWER_PREFIX, which the model continues with a number.
    assert model.messages[-1] == {"role": "assistant", "content": ANSWER_PREFIX}
    assert result.text == "According to [1], he was baptized in 1564, married in 1582 [2]."
    assert [c.number for c in result.citations] == [1, 2]
    prompt = model.messages[-2]["content"]
    for i, hit in enumerate(result.sources, start=1):
        assert f"[{i}] ({hit.chunk.title})\n{hit.chunk.text}" in prompt
    for c in result.citations:
        hit = result.sources[c.number - 1]
        assert (c.source, c.start, c.end, c.text) == (
            hit.chunk.source,
            hit.chunk.start,
            hit.chunk.end,
            hit.chunk.text,
        )
        assert DOC[c.start : c.end] == c.text
    assert "Sources:" in format_answer(result)


def test_a_reply_that_runs_on_into_a_source_header_is_cut(index):
    hits = index.search("Globe", 2)
    title = hits[1].chunk.title
    model = StubModel(f"2], the Globe was built in 1599.\n\n[2] ({title})\nThe Globe [1]")
    result = answer("When was the Globe built?", index, model, k=2, min_similarity=-1,
                    answer_prefix=ANSWER_PREFIX)  # fmt: skip
    assert result.text == "According to [2], the Globe was built in 1599."
    assert [c.number for c in result.citations] == [2] and f"[2] ({title})" in result.raw_text
    assert cut_source_echo("no echo [1] (here", hits) == "no echo [1] (here"
    free = answer("When?", index, StubModel("In 1599 [1]."), k=2, min_similarity=-1)
    assert free.text == "In 1599 [1]."  # no prefix by default


def test_an_uncited_answer_is_attributed_by_word_overlap(index):
    question = "What was the trade of Shakespeare's father?"
    model = StubModel("His father was a glover and a burgess.")
    result = answer(question, index, model, k=3, min_similarity=-1)
    assert result.citations == [] and result.attributed is not None
    assert "glover" in result.attributed.text and "burgess" in result.attributed.text
    assert model.messages[-1]["role"] == "user"  # no prefix unless asked
    out = format_answer(result)
    assert f"  *[{result.attributed.number}] " in out and "the model cited none" in out
    # Words only from the question, or shared by no source: no attribution.
    assert attribute("Shakespeare's father had a trade.", question, result.sources) is None
    assert attribute("A fishmonger in Leeds.", question, result.sources) is None
    cited = answer(question, index, StubModel("A glover [1]."), k=3, min_similarity=-1)
    assert cited.attributed is None  # the model's own citation stands


def test_citations_always_refer_to_retrieved_chunks(index):
    rng = random.Random(0)
    for trial in range(30):
        k = rng.randint(1, 4)
        numbers = [rng.randint(-1, 8) for _ in range(rng.randint(0, 6))]
        reply = " ".join(f"claim{i} [{n}]" for i, n in enumerate(numbers))
        result = answer(
            f"question {trial} Stratford", index, StubModel(reply), k=k, min_similarity=-1
        )
        retrieved = {(h.chunk.source, h.chunk.start, h.chunk.end) for h in result.sources}
        assert len(result.sources) <= k
        for c in result.citations:
            assert 1 <= c.number <= len(result.sources)
            assert (c.source, c.start, c.end) in retrieved
        _, cited, _ = resolve_citations(result.text, len(result.sources))
        assert cited == [c.number for c in result.citations]  # the text cites nothing else


def test_nothing_relevant_tells_the_model_to_say_it_does_not_know(index):
    model = StubModel("I do not know [1].")
    result = answer("When was Shakespeare baptized?", index, model, min_similarity=1.01)
    assert result.text == NO_ANSWER and model.messages is None  # abstains without the model
    result = answer(
        "When was Shakespeare baptized?", index, model, min_similarity=1.01, abstain=False
    )
    assert result.sources == [] and result.citations == [] and result.dropped == [1]
    assert NO_SOURCES_PROMPT in model.messages[-1]["content"]
    assert "No relevant sources" in format_answer(result)
    assert build_messages("q", [])[0]["role"] == "system"


def test_augment_messages_grounds_the_last_user_turn(index):
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": [{"type": "text", "text": "When was the Globe built?"}]},
    ]
    out, hits = augment_messages(index, messages, top_k=2, min_similarity=0.0)
    assert 1 <= len(hits) <= 2 and messages[0]["content"] == "Be terse."  # input untouched
    assert out[0] == {"role": "system", "content": SYSTEM_PROMPT + "\n\nBe terse."}
    assert out[1:3] == messages[1:3]
    assert out[3]["role"] == "user"
    assert out[3]["content"] == build_messages("When was the Globe built?", hits)[1]["content"]
    assert "1599" in out[3]["content"]
    # No system message: one is added; no relevant hit: nothing changes.
    out, _ = augment_messages(index, messages[1:2], min_similarity=-1.0)
    assert [m["role"] for m in out] == ["system", "user"]
    out, hits = augment_messages(index, messages, min_similarity=1.01)
    assert out == messages and hits == []
    with pytest.raises(ValueError, match="no user message"):
        augment_messages(index, [{"role": "system", "content": "x"}])


def test_render_sources_marks_cited_and_cleans_the_reply(index):
    _, hits = augment_messages(
        index, [{"role": "user", "content": "Who married Anne Hathaway?"}], 3, min_similarity=-1
    )
    text, sources = render_sources(hits, "He married her in 1582 [2] [9].")
    assert text == "He married her in 1582 [2]."
    assert [s["number"] for s in sources] == list(range(1, len(hits) + 1))
    assert [s["cited"] for s in sources] == [n == 2 for n in range(1, len(hits) + 1)]
    for s, h in zip(sources, hits, strict=True):
        assert DOC[s["start"] : s["end"]] == s["text"] == h.chunk.text
    assert render_sources(hits)[0] is None
    assert json.dumps(render_sources(hits)[1])  # JSON-ready


@pytest.mark.slow
@pytest.mark.data
def test_end_to_end_on_the_britannica_article(tmp_path):
    from models import load_pretrained
    from rag.answer import chat_completer
    from rag.embed import PretrainedEmbedder
    from rag.eval.data import find_span
    from rag.eval.retrieval import is_relevant
    from train import corpus

    try:
        article = corpus.load_britannica_article()
    except corpus.CorpusUnavailable as e:
        pytest.skip(f"corpus unavailable: {e}")
    # The article's opening (the biography's first pages) keeps embedding to ~10 s on a CPU.
    path = tmp_path / "britannica.txt"
    path.write_text(article.text[:12_000])
    embedder = PretrainedEmbedder()
    with Index.open(tmp_path / "idx", embedder, create=True) as index:
        index.add_paths([path])
        question = "On what date and where was Shakespeare baptized?"
        text = path.read_text()
        gold = find_span(text, "parish church of Stratford-upon-Avon in Warwickshire")
        hits = index.search(question, k=3)
        assert any(is_relevant(h.chunk.start, h.chunk.end, gold) for h in hits)
        complete = chat_completer(load_pretrained("smollm2-135m-instruct"), max_tokens=48)
        result = answer(question, index, complete)
        assert result.sources and result.text
        for c in result.citations:
            assert text[c.start : c.end] == c.text
            assert c.number <= len(result.sources)
        unrelated = answer("How do I configure a Kubernetes ingress?", index, complete)
        assert unrelated.sources == [] and unrelated.text == NO_ANSWER
