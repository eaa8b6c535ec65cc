"""The evaluation sets and the corpus they are about, with gold spans checked against the text.

britannica_qa.json  fact questions on the Britannica article: a gold quotation (its span is the
                    relevant passage) and short answer strings for end-to-end accuracy.
known_items.json    paraphrased lines -> the play and act they come from; gold = the line.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re

from rag.ingest import SourceDoc, read_document

QA_PATH = pathlib.Path(__file__).with_name("britannica_qa.json")
KNOWN_ITEMS_PATH = pathlib.Path(__file__).with_name("known_items.json")
_ACT = re.compile(r"^ACT\s+([IVX]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b", re.M | re.I)
_ACT_WORDS = {"FIRST": 1, "SECOND": 2, "THIRD": 3, "FOURTH": 4, "FIFTH": 5}
_ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5}


@dataclasses.dataclass(frozen=True)
class Query:
    """One eval query and where its answer lies.

    Attributes:
      text: the question or paraphrase.
      source: the document the gold spans are in (a `SourceDoc.source`).
      gold: (start, end) spans in that document; a chunk covering half of any one is relevant.
      answers: short strings for end-to-end scoring (fact questions only).
      act: the act of the gold line (known items only).
    """

    text: str
    source: str
    gold: tuple[tuple[int, int], ...]
    answers: tuple[str, ...] = ()
    act: int | None = None


def find_spans(text: str, quote: str) -> list[tuple[int, int]]:
    """Every span of `quote` in `text`, any run of whitespace matching any other."""
    pattern = r"\s+".join(re.escape(w) for w in quote.split())
    return [m.span() for m in re.finditer(pattern, text)]


def find_span(text: str, quote: str) -> tuple[int, int]:
    """The first span of `quote` in `text` (whitespace-insensitive); ValueError if none."""
    spans = find_spans(text, quote)
    if not spans:
        raise ValueError(f"gold quote not found in the text: {quote!r}")
    return spans[0]


def act_at(text: str, offset: int) -> int | None:
    """The act a play's character `offset` is in: the last "ACT n" heading before it."""
    heads = list(_ACT.finditer(text, 0, offset))
    if not heads:
        return None
    name = heads[-1].group(1).upper()
    return _ROMAN.get(name) or _ACT_WORDS.get(name) or int(name)


def britannica_document() -> SourceDoc:
    """The article as `python -m rag.index` reads its file (offsets match an index of it)."""
    from train import corpus

    article = corpus.load_britannica_article()
    return read_document(article.path, title=article.title)


def play_documents() -> dict[str, SourceDoc]:
    """name ("hamlet") -> the 42 plays and poems of the corpus, read as files."""
    from train import corpus

    shakespeare = corpus.load_corpus("shakespeare")
    docs = sorted(shakespeare.train + shakespeare.val, key=lambda d: d.name)
    return {d.name: read_document(d.path, title=d.title) for d in docs}


def fact_questions(article: SourceDoc, path: pathlib.Path = QA_PATH) -> list[Query]:
    """The Britannica questions; every gold quote must occur in the article."""
    items = json.loads(path.read_text())["questions"]
    return [
        Query(
            q["question"],
            article.source,
            (find_span(article.text, q["gold"]),),
            tuple(q.get("answers", ())),
        )
        for q in items
    ]


def known_items(
    plays: dict[str, SourceDoc], path: pathlib.Path = KNOWN_ITEMS_PATH, skip_missing: bool = False
) -> list[Query]:
    """The paraphrase queries; the gold line must occur in its play, within the stated act.

    With `skip_missing`, queries about plays not in `plays` are left out instead of an error.
    """
    out = []
    for q in json.loads(path.read_text())["queries"]:
        if skip_missing and q["play"] not in plays:
            continue
        if q["play"] not in plays:
            raise ValueError(f"{q['play']!r} is not a play of the corpus: {sorted(plays)}")
        doc = plays[q["play"]]
        spans = find_spans(doc.text, q["gold"])
        if not spans:
            raise ValueError(f"gold line not found in {q['play']}: {q['gold']!r}")
        acts = {act_at(doc.text, s) for s, _ in spans}
        if acts != {q["act"]}:
            raise ValueError(f"{q['gold']!r} is in act(s) {acts} of {q['play']}, not {q['act']}")
        out.append(Query(q["query"], doc.source, tuple(spans), act=q["act"]))
    return out
