"""Grounded answers: retrieve, prompt the chat model with numbered sources, resolve its citations.

The language model is a plain callable `complete(messages) -> str` (`chat_completer(lm)` wraps
a loaded model), so tests can stub it; when the last message is the assistant's, it continues
that message and returns the continuation. Citations the model makes to numbers that are not
among the sources it was shown are dropped from both the text and the citation list.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

from rag.index import Hit, Index
from rag.search import bm25_tokenize

Messages = list[dict[str, str]]
Completer = Callable[[Messages], str]

# all-MiniLM-L6-v2 cosine below which a chunk is taken as unrelated to the question: related
# passages score ~0.35-0.7, unrelated ones ~0-0.2.
MIN_SIMILARITY = 0.25
NO_ANSWER = "I don't know: the indexed documents do not say."

SYSTEM_PROMPT = (
    "You answer questions using only the numbered sources given. Cite every source you use "
    "with its number in square brackets, like [1] or [2]. If the sources do not contain the "
    "answer, say that you do not know."
)
ANSWER_PROMPT = "Answer in one or two sentences using only the sources, and cite them like [1]."
NO_SOURCES_PROMPT = (
    "No relevant sources were found for this question. Do not guess: reply that you do not "
    "know the answer."
)

# A start for the reply (`answer(answer_prefix=...)`), prefilled so that the model goes on
# with a source number. On the 52 evaluation questions SmolLM2-135M then cites in all 52 answers
# (2 unprompted) at the same accuracy, but its sentences get worse (it takes "[2]" for the
# answer: "Shakespeare was born in [2]."), so it is opt-in; word-overlap attribution
# (`attribute`) is the default for uncited answers (docs/rag.md).
ANSWER_PREFIX = "According to ["

_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


@dataclasses.dataclass(frozen=True)
class Citation:
    """A source the answer cites: its number in the prompt and where its text comes from."""

    number: int
    source: str
    title: str
    start: int
    end: int
    text: str


@dataclasses.dataclass(frozen=True)
class Answer:
    """The model's answer with citations resolved.

    Attributes:
      question: what was asked.
      text: the answer, citations to unknown numbers removed.
      citations: cited sources, in order of first citation.
      sources: the hits shown to the model; source i is `sources[i - 1]`.
      dropped: cited numbers that were not among the sources.
      raw_text: the reply as generated, a prefilled prefix included.
      attributed: when the model cited nothing, the source its answer's words match
        (`attribute`): found by this code, not cited by the model.
    """

    question: str
    text: str
    citations: list[Citation]
    sources: list[Hit]
    dropped: list[int]
    raw_text: str
    attributed: Citation | None = None


def grounded_user_content(question: str, hits: Sequence[Hit]) -> str:
    """The user turn that carries the numbered sources, then the question and the instruction."""
    if not hits:
        return f"{NO_SOURCES_PROMPT}\n\nQuestion: {question}"
    blocks = [f"[{i}] ({h.chunk.title})\n{h.chunk.text}" for i, h in enumerate(hits, start=1)]
    # The question and the instruction come last: SmolLM2-135M follows what it read last
    # (with the instruction only in the system prompt it wandered off the sources).
    return "Sources:\n\n" + "\n\n".join(blocks) + f"\n\nQuestion: {question}\n{ANSWER_PROMPT}"


def build_messages(question: str, hits: Sequence[Hit]) -> Messages:
    """Chat messages: the grounding instructions, then the numbered sources and the question."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": grounded_user_content(question, hits)},
    ]


# Words of a reply's boilerplate ("The answer is ...") that say nothing of where it came from.
_REPLY_WORDS = frozenset({"answer", "question", "source", "sources", "according"})


def attribute(text: str, question: str, hits: Sequence[Hit], min_words: int = 2) -> int | None:
    """The number of the source the answer's new words come from, when the model cited none.

    New words: the answer's words (`bm25_tokenize`: lowercased, no stop words) of three letters
    or more, or digits, that are not in the question. The source sharing the most of them wins
    (the higher-ranked on a tie); None when no source shares `min_words`. This is attribution by
    word overlap, done by this code, not a citation the model made.
    """
    asked = set(bm25_tokenize(question)) | _REPLY_WORDS
    new = {w for w in bm25_tokenize(text) if (len(w) >= 3 or w.isdigit()) and w not in asked}
    best, best_count = None, min_words - 1
    for i, hit in enumerate(hits, start=1):
        count = len(new & set(bm25_tokenize(hit.chunk.text)))
        if count > best_count:
            best, best_count = i, count
    return best


def cut_source_echo(text: str, hits: Sequence[Hit]) -> str:
    """The text up to where the model starts copying a source's header ("[2] (Title") out of
    the prompt: small models run on from their answer into the next source."""
    cuts = [text.find(f"[{i}] ({h.chunk.title[:24]}") for i, h in enumerate(hits, start=1)]
    cuts = [c for c in cuts if c >= 0]
    return text[: min(cuts)].rstrip() if cuts else text


def resolve_citations(text: str, num_sources: int) -> tuple[str, list[int], list[int]]:
    """Finds [n] and [n, m] citations; keeps numbers in 1..num_sources.

    Returns:
      (text with invalid numbers removed, valid numbers in order of first use, dropped numbers).
    """
    cited: list[int] = []
    dropped: list[int] = []

    def keep_valid(match: re.Match) -> str:
        numbers = [int(n) for n in re.findall(r"\d+", match.group(1))]
        valid = [n for n in numbers if 1 <= n <= num_sources]
        dropped.extend(n for n in numbers if n not in valid)
        cited.extend(n for n in valid if n not in cited)
        return "[" + ", ".join(map(str, valid)) + "]" if valid else ""

    clean = _CITATION.sub(keep_valid, text)
    clean = re.sub(r"[ \t]+([.,;:!?])", r"\1", clean)  # " [9]." minus the citation -> "."
    clean = re.sub(r"[ \t]{2,}", " ", clean).strip()
    return clean, cited, dropped


def answer(
    question: str,
    index: Index,
    complete: Completer,
    *,
    k: int = 3,
    min_similarity: float = MIN_SIMILARITY,
    mode: str = "hybrid",
    abstain: bool = True,
    answer_prefix: str | None = None,
    attribute_uncited: bool = True,
    **search_kwargs,
) -> Answer:
    """Answers `question` from the index with the chat model.

    Args:
      question: the question.
      index: an open `rag.index.Index`.
      complete: messages -> the model's reply (see `chat_completer`).
      k: most sources shown to the model (SmolLM2-135M drifts to the wrong source with 4).
      min_similarity: hits whose dense similarity to the question is below this are dropped;
        with none left the model is told to say it does not know.
      mode: the retrieval mode (`Index.search`).
      abstain: with no relevant source, reply `NO_ANSWER` without calling the model. Small
        models ignore "say you do not know" (SmolLM2-135M invented a `kube-config` tool for a
        Kubernetes question), so this is the default; False sends the no-sources prompt.
      answer_prefix: the start of the reply, prefilled as an assistant message that the model
        continues (ANSWER_PREFIX makes it begin by naming a source); None lets it start freely.
      attribute_uncited: when the reply cites no source, set `Answer.attributed` to the source
        its words match (`attribute`).
      **search_kwargs: filters etc. for `Index.search`.
    """
    hits = [
        h
        for h in index.search(question, k, mode=mode, **search_kwargs)
        if h.dense >= min_similarity
    ]
    if not hits and abstain:
        return Answer(question, NO_ANSWER, [], [], [], NO_ANSWER)
    messages = build_messages(question, hits)
    prefix = answer_prefix if hits and answer_prefix else ""
    if prefix:
        messages.append({"role": "assistant", "content": prefix})
    raw = prefix + complete(messages)
    text, cited, dropped = resolve_citations(cut_source_echo(raw, hits), len(hits))
    citations = [_citation(n, hits) for n in cited]
    attributed = None
    if not citations and hits and attribute_uncited:
        number = attribute(text, question, hits)
        attributed = _citation(number, hits) if number else None
    return Answer(question, text, citations, hits, dropped, raw, attributed)


def _citation(number: int, hits: Sequence[Hit]) -> Citation:
    c = hits[number - 1].chunk
    return Citation(number, c.source, c.title, c.start, c.end, c.text)


def chat_completer(lm, max_tokens: int = 96) -> Completer:
    """Wraps a loaded chat model (`models.load_pretrained`) as greedy `complete(messages)`
    (a final assistant message is continued: `infer.generate` does that)."""
    from infer import generate

    return lambda messages: generate(lm, messages, max_tokens=max_tokens, temperature=0.0)


def format_answer(result: Answer) -> str:
    """The answer, then each cited source (or the retrieved ones, the attributed one starred, if
    none is cited) with offsets."""
    lines = [result.text, ""]
    if result.citations:
        lines.append("Sources:")
        lines += [
            f"  [{c.number}] {c.source} [{c.start}:{c.end}] {c.title}" for c in result.citations
        ]
    elif result.sources:
        matched = result.attributed.number if result.attributed else None
        lines.append(
            "Retrieved (the model cited none; * = the source the answer's words match):"
            if matched
            else "Retrieved (not cited):"
        )
        lines += [
            f"  {'*' if i == matched else ' '}[{i}] {h.chunk.source} [{h.chunk.start}:"
            f"{h.chunk.end}] {h.chunk.title}"
            for i, h in enumerate(result.sources, start=1)
        ]
    else:
        lines.append("No relevant sources were retrieved.")
    return "\n".join(lines)


def message_text(content) -> str:
    """The text of a chat message's content: a string, or OpenAI-style parts (text kept)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    raise ValueError(f"message content must be a string or a list of parts, got {type(content)}")


def augment_messages(
    index: Index,
    messages: Sequence[dict],
    top_k: int = 3,
    *,
    min_similarity: float = MIN_SIMILARITY,
    mode: str = "hybrid",
    **search_kwargs,
) -> tuple[Messages, list[Hit]]:
    """Grounds a chat request in the index, for a server started with `--rag-index DIR`.

    The last user message is the query. When relevant chunks are found, that message is replaced
    by the numbered sources, the question and the citation instruction (`build_messages`' user
    turn), and the grounding instructions go first in the system message (merged with the
    request's own system message, if any). Earlier turns are kept as they are. With no relevant
    chunk the messages come back unchanged and the source list is empty: the server answers as
    it would without an index (it may say so, e.g. with `render_sources([])`).

    Args:
      index: an open `rag.index.Index`.
      messages: OpenAI-style chat messages ({"role", "content"}); not modified.
      top_k: most sources added (SmolLM2-135M drifts to the wrong source with 4).
      min_similarity: hits below this dense similarity are dropped (`answer`).
      mode / **search_kwargs: passed to `Index.search` (filters, reranker).

    Returns:
      (messages for the model, the hits numbered [1]..[n] in them).

    Raises:
      ValueError: no user message, or an unreadable content.
    """
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        raise ValueError(
            f"no user message to retrieve for among roles {[m.get('role') for m in messages]}"
        )
    question = message_text(messages[last_user]["content"])
    hits = [
        h
        for h in index.search(question, top_k, mode=mode, **search_kwargs)
        if h.dense >= min_similarity
    ]
    out = [dict(m) for m in messages]
    if not hits:
        return out, []
    out[last_user] = {"role": "user", "content": grounded_user_content(question, hits)}
    if out and out[0].get("role") == "system":
        out[0]["content"] = SYSTEM_PROMPT + "\n\n" + message_text(out[0]["content"])
    else:
        out.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    return out, hits


def render_sources(hits: Sequence[Hit], reply: str | None = None) -> tuple[str | None, list[dict]]:
    """JSON-ready sources for a response, and the reply with invalid citations removed.

    Args:
      hits: the sources from `augment_messages`, numbered from 1.
      reply: the model's text; None when only the sources are wanted.

    Returns:
      (cleaned reply or None, [{"number", "source", "title", "start", "end", "score",
      "similarity", "text", "cited"}]); "cited" is whether the reply cites that number.
    """
    cited: list[int] = []
    text = None
    if reply is not None:
        text, cited, _ = resolve_citations(reply, len(hits))
    sources = [
        {
            "number": i,
            "source": h.chunk.source,
            "title": h.chunk.title,
            "start": h.chunk.start,
            "end": h.chunk.end,
            "score": h.score,
            "similarity": h.dense,
            "text": h.chunk.text,
            "cited": i in cited,
        }
        for i, h in enumerate(hits, start=1)
    ]
    return text, sources
