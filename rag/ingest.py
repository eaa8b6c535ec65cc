"""Reads plain text, Markdown and HTML files (or a directory of them) into `SourceDoc`s.

Offsets of chunks refer to `SourceDoc.text`: for .txt/.md that is the file decoded as
`train.corpus.read_text` does (UTF-8 or Latin-1, newlines normalised to "\\n"); for HTML it is
the text extracted by `html_to_text` (tags dropped, entities decoded), not the raw markup.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html.parser
import os
import pathlib
import re
from collections.abc import Iterable

from train.corpus import read_text

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
HTML_SUFFIXES = (".html", ".htm")
SUFFIXES = TEXT_SUFFIXES + HTML_SUFFIXES


@dataclasses.dataclass(frozen=True)
class SourceDoc:
    """One ingested file.

    Attributes:
      source: the file's resolved path as a string; the key chunks and filters use.
      title: Markdown's first heading, HTML's <title> or first <h1>, else the file stem.
      text: the text chunk offsets index into (see the module docstring).
    """

    source: str
    title: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


# Elements whose content is never shown as text.
_SKIP_TAGS = frozenset({"script", "style", "head", "noscript", "template", "svg"})
# Elements that start a new block: a paragraph break keeps sentences of neighbours apart.
_BLOCK_TAGS = frozenset(
    "p div section article header footer main aside nav h1 h2 h3 h4 h5 h6 ul ol li dl dt dd "
    "table tr blockquote pre figure figcaption hr form title".split()
)


class _TextExtractor(html.parser.HTMLParser):
    """Collects visible text; block elements become blank lines, whitespace runs collapse."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0
        self.pre_depth = 0
        self.title: str | None = None
        self.h1: str | None = None
        self._capture: str | None = None  # "title" or "h1" while inside one
        self._captured: list[str] = []

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in _SKIP_TAGS and tag != "head":
            self.skip_depth += 1
        if tag == "pre":
            self.pre_depth += 1
        if tag == "br":
            self.parts.append("\n")
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n\n")
        if tag in ("title", "h1") and self._capture is None:
            self._capture, self._captured = tag, []

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS and tag != "head" and self.skip_depth:
            self.skip_depth -= 1
        if tag == "pre" and self.pre_depth:
            self.pre_depth -= 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n\n")
        if tag == self._capture:
            text = " ".join("".join(self._captured).split())
            if tag == "title" and self.title is None:
                self.title = text or None
            if tag == "h1" and self.h1 is None:
                self.h1 = text or None
            self._capture = None

    def handle_data(self, data: str) -> None:
        if self._capture:
            self._captured.append(data)
        if self.skip_depth or self._capture == "title":
            return
        self.parts.append(data if self.pre_depth else re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> tuple[str, str | None]:
    """Extracts the visible text of an HTML page with the stdlib parser.

    Returns:
      (text, title): paragraphs separated by one blank line, spaces collapsed outside <pre>,
      trailing spaces stripped from lines; the <title> (else first <h1>) or None.
    """
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    text = "".join(parser.parts)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n[ \t]+(?=\S)", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    return text, parser.title or parser.h1


def _markdown_title(text: str) -> str | None:
    match = re.search(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE)
    return match.group(1).strip() if match else None


def read_document(path: str | os.PathLike, title: str | None = None) -> SourceDoc:
    """Reads one .txt/.md/.html file into a `SourceDoc` (see the module docstring for offsets)."""
    path = pathlib.Path(path).resolve()
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; expected one of {SUFFIXES}")
    raw = read_text(path)
    if suffix in HTML_SUFFIXES:
        text, found = html_to_text(raw)
    else:
        text = raw
        found = _markdown_title(raw) if suffix != ".txt" else None
    return SourceDoc(source=str(path), title=title or found or path.stem, text=text)


def iter_files(paths: Iterable[str | os.PathLike]) -> list[pathlib.Path]:
    """Expands files and directories (recursively, supported suffixes only) in sorted order."""
    files: list[pathlib.Path] = []
    for p in paths:
        p = pathlib.Path(p)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
            if not found:
                raise ValueError(f"{p}: no {'/'.join(SUFFIXES)} files in this directory")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return files


def read_documents(paths: Iterable[str | os.PathLike]) -> list[SourceDoc]:
    """Reads files and directories of files (see `iter_files`) into `SourceDoc`s."""
    return [read_document(f) for f in iter_files(paths)]
