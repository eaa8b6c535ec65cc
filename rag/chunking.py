"""Token-aware, sentence-aware recursive splitting with overlap; chunks keep exact offsets.

A text is cut at the coarsest boundary that makes pieces fit (paragraphs, sentences, lines,
words, then halves of a word), and adjacent pieces are packed greedily into chunks of at most
`chunk_size` tokens; each chunk restarts with the last pieces of the previous one covering up to
`overlap` tokens. Every chunk is a span of the source: `text[chunk.start:chunk.end] == chunk.text`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from rag.ingest import SourceDoc

# From coarse to fine; each pattern matches the separator between two pieces. Sentences come
# before lines: in hard-wrapped text (the Britannica article) a line break means nothing.
_SEPARATORS = (
    re.compile(r"[ \t]*\n[ \t]*\n\s*"),  # paragraphs
    # sentences (and clauses after ; or :), a closing quote or bracket staying with its sentence
    re.compile(r"(?:(?<=[.!?;:])|(?<=[.!?;:][\"')\]]))\s+"),
    re.compile(r"[ \t]*\n\s*"),  # lines (headings, list items without a full stop)
    re.compile(r"\s+"),  # words
)


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
    """Sizes in the embedder's tokens (no [CLS]/[SEP]); keep chunk_size + 2 <= its max_seq_len."""

    chunk_size: int = 128  # all-MiniLM-L6-v2 was trained on 128-token inputs
    overlap: int = 24  # carries a sentence or two across a boundary

    def __post_init__(self) -> None:
        if self.chunk_size < 8:
            raise ValueError(f"chunk_size={self.chunk_size} must be at least 8 tokens")
        if not 0 <= self.overlap < self.chunk_size // 2 + 1:
            raise ValueError(
                f"overlap={self.overlap} must be in [0, chunk_size // 2={self.chunk_size // 2}]"
            )


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A span of a source document: `doc.text[start:end] == text`."""

    source: str
    title: str
    start: int
    end: int
    text: str


Span = tuple[int, int]


def _split(text: str, span: Span, level: int) -> list[Span]:
    """Pieces of `text[span]` cut at the separators of `level` (separators excluded)."""
    start, end = span
    if level >= len(_SEPARATORS):  # no boundary left: cut in the middle
        mid = (start + end) // 2
        return [(start, mid), (mid, end)]
    pieces, pos = [], start
    for m in _SEPARATORS[level].finditer(text, start, end):
        if m.start() > pos:
            pieces.append((pos, m.start()))
        pos = m.end()
    if pos < end:
        pieces.append((pos, end))
    return pieces


def _atoms(
    text: str, span: Span, level: int, chunk_size: int, count: Callable[[str], int]
) -> list[tuple[int, int, int]]:
    """Recursively splits `span` into (start, end, tokens) pieces each of <= chunk_size tokens."""
    n = count(text[span[0] : span[1]])
    if n <= chunk_size or span[1] - span[0] <= 1:
        return [(span[0], span[1], n)]
    pieces = _split(text, span, level)
    while len(pieces) == 1 and level < len(_SEPARATORS):  # this level does not cut here
        level += 1
        pieces = _split(text, span, level)
    out = []
    for piece in pieces:
        out.extend(_atoms(text, piece, level + 1, chunk_size, count))
    return out


def split_text(
    text: str, count_tokens: Callable[[str], int], config: ChunkConfig = ChunkConfig()
) -> list[Span]:
    """Chunk spans of `text`: (start, end) with no leading/trailing whitespace.

    Args:
      text: the document text.
      count_tokens: number of embedder tokens in a string (no special tokens).
      config: chunk size and overlap in tokens.

    Returns:
      Spans in order; consecutive chunks overlap by up to `config.overlap` tokens.
    """
    stripped = text.strip()
    if not stripped:
        return []
    first = text.index(stripped[0])
    atoms = _atoms(text, (first, first + len(stripped)), 0, config.chunk_size, count_tokens)
    spans: list[Span] = []
    i = 0
    while i < len(atoms):
        # Pack atoms i..j-1 greedily by their summed token counts.
        budget = config.chunk_size
        j, used = i, 0
        while j < len(atoms) and used + atoms[j][2] <= budget:
            used += atoms[j][2]
            j += 1
        j = max(j, i + 1)
        # The sum may undercount the span (separators, merged word pieces): shrink until it fits.
        while j > i + 1 and count_tokens(text[atoms[i][0] : atoms[j - 1][1]]) > budget:
            j -= 1
        spans.append((atoms[i][0], atoms[j - 1][1]))
        if j >= len(atoms):
            break
        # Next chunk starts with the trailing atoms of this one that fit in `overlap`.
        k, carried = j, 0
        while k - 1 > i and carried + atoms[k - 1][2] <= config.overlap:
            carried += atoms[k - 1][2]
            k -= 1
        if k == j and config.overlap:  # no whole piece fits: carry the words of the last one
            tail = _word_tail(text, atoms[j - 1], config.overlap, count_tokens)
            if tail is not None:
                k = j - 1
                atoms[k] = tail
        i = k
    return spans


def _word_tail(
    text: str, atom: tuple[int, int, int], overlap: int, count: Callable[[str], int]
) -> tuple[int, int, int] | None:
    """The longest run of whole words ending `atom` with at most `overlap` tokens, or None.

    The first word of the atom is never included, so the next chunk still starts later.
    """
    start, end, _ = atom
    best = None
    for m in reversed(list(_SEPARATORS[-1].finditer(text, start, end))):
        n = count(text[m.end() : end])
        if n > overlap:
            break
        best = (m.end(), end, n)
    return best


def chunk_document(
    doc: SourceDoc, count_tokens: Callable[[str], int], config: ChunkConfig = ChunkConfig()
) -> list[Chunk]:
    """Splits a document into `Chunk`s whose offsets index `doc.text`."""
    return [
        Chunk(source=doc.source, title=doc.title, start=s, end=e, text=doc.text[s:e])
        for s, e in split_text(doc.text, count_tokens, config)
    ]
