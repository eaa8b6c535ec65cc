"""Tokenizers behind one interface: characters, UTF-8 bytes, and SentencePiece (BPE or unigram).

Each saves to a directory as a `tokenizer.json` manifest naming its kind (plus the
SentencePiece model file), and `load_tokenizer` restores whichever kind was saved.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

import numpy as np
import sentencepiece as spm

MANIFEST = "tokenizer.json"
SENTENCEPIECE_MODEL = "sentencepiece.model"
TOKENIZER_KINDS = ("char", "byte", "sentencepiece_bpe", "sentencepiece_unigram")


@runtime_checkable
class Tokenizer(Protocol):
    """What the trainer and samplers need from a tokenizer."""

    kind: str  # One of TOKENIZER_KINDS; recorded in the manifest.

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int | None:
        """The end-of-document id, or None when the vocabulary has none."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, directory: str | os.PathLike) -> None: ...


def _write_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    path = pathlib.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    # Written last, so a directory with a manifest holds a complete tokenizer.
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def _in_vocab(ids: Iterable[int], vocab_size: int, replacement: int) -> list[int]:
    """Replaces ids outside [0, vocab_size) so that they decode to U+FFFD.

    A model whose embedding is padded beyond the tokenizer's vocabulary (for efficient
    matmul shapes) can sample such ids, and a sample should show them, not crash.
    """
    return [i if 0 <= i < vocab_size else replacement for i in map(int, ids)]


class CharTokenizer:
    """One id per character seen in the training text, as in nanoGPT's character level.

    Id 0 is `<unk>`: a character absent from the training text encodes to it (rather than
    failing on, say, a curly quote in a prompt) and decodes to U+FFFD, as do ids outside
    the vocabulary. The characters,
    sorted by code point, take ids 1..len(chars). There is no end-of-document id.
    """

    kind = "char"
    UNK_ID = 0
    UNK_TEXT = "\ufffd"

    def __init__(self, chars: Iterable[str]):
        chars = list(chars)
        if not chars:
            raise ValueError("CharTokenizer needs at least one character; the text is empty")
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer needs distinct single characters")
        self.chars = sorted(chars)
        # Sorted code points let encode find every id with one vectorised searchsorted.
        self._code_points = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        self._itos = [self.UNK_TEXT, *self.chars]

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    @property
    def eos_id(self) -> None:
        return None

    def encode_array(self, text: str) -> np.ndarray:
        """Encodes to an int32 array [len(text)]; fast enough for megabytes of text."""
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        pos = np.searchsorted(self._code_points, points)
        pos = np.minimum(pos, len(self._code_points) - 1)
        known = self._code_points[pos] == points
        return np.where(known, pos + 1, self.UNK_ID).astype(np.int32)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self._itos[i] for i in _in_vocab(ids, self.vocab_size, self.UNK_ID))

    def save(self, directory: str | os.PathLike) -> None:
        _write_manifest(directory, {"kind": self.kind, "chars": "".join(self.chars)})


class ByteTokenizer:
    """The 256 byte values of the UTF-8 encoding; no training, no unknowns, no eos.

    Decoding an id sequence that is not valid UTF-8 (a model can emit half a character)
    gives U+FFFD for the broken bytes instead of failing, as do ids outside [0, 256).
    """

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def eos_id(self) -> None:
        return None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        # 0xFF never occurs in UTF-8, so it decodes to U+FFFD.
        return bytes(_in_vocab(ids, 256, 0xFF)).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        _write_manifest(directory, {"kind": self.kind})


# Fixed special ids, then "\n" as its own piece, then the 256 byte-fallback pieces.
_SP_SPECIAL = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}
_SP_MIN_VOCAB = len(_SP_SPECIAL) + 1 + 256
# SentencePiece skips training sentences longer than max_sentence_length (4192 bytes);
# long lines are cut into chunks so none is lost.
_SP_CHUNK_CHARS = 2000
# Sentences sampled for training: Shakespeare has ~170k non-empty lines and trains whole
# (so training is deterministic); bigger corpora are sampled to keep training under a minute.
_SP_INPUT_SENTENCES = 1_000_000


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            for start in range(0, len(line), _SP_CHUNK_CHARS):
                yield line[start : start + _SP_CHUNK_CHARS]


class SentencePieceTokenizer:
    """A SentencePiece model set up so that decode(encode(text)) == text.

    SentencePiece normalises text by default (NFKC, collapsing runs of spaces, a dummy
    leading space); here normalisation is the identity, whitespace is kept, "\\n" is a
    piece of its own, and characters outside the vocabulary fall back to their UTF-8
    bytes. Ids: 0 <pad>, 1 <unk>, 2 <s>, 3 </s> (eos), 4 "\\n", 5..260 bytes. <unk> and
    ids outside the vocabulary decode to U+FFFD.
    One exception to the round trip: the character U+2581 itself, which SentencePiece
    uses to mark spaces, decodes as a space.
    """

    def __init__(self, model_proto: bytes, kind: str):
        if kind not in ("sentencepiece_bpe", "sentencepiece_unigram"):
            raise ValueError(f"kind={kind!r} is not a SentencePiece kind")
        self.kind = kind
        self.model_proto = model_proto
        self.processor = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        model_type: str = "bpe",
        workdir: str | os.PathLike | None = None,
    ) -> SentencePieceTokenizer:
        """Trains a model in-process on the lines of `texts`.

        Args:
          texts: training documents; each line is one SentencePiece training sentence.
          vocab_size: total vocabulary, including the 5 special pieces and 256 bytes.
          model_type: "bpe" or "unigram".
          workdir: if given, the trained tokenizer is saved there.

        Returns:
          The trained tokenizer.
        """
        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type={model_type!r}; expected 'bpe' or 'unigram'")
        if vocab_size <= _SP_MIN_VOCAB:
            raise ValueError(
                f"vocab_size={vocab_size} leaves no room for learned pieces: SentencePiece "
                f"here reserves {_SP_MIN_VOCAB} ids (specials, newline, 256 bytes)"
            )
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_training_lines(texts),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                byte_fallback=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                user_defined_symbols=["\n"],
                allow_whitespace_only_pieces=True,
                unk_surface="\ufffd",  # Instead of " \u2047 ", like the other tokenizers.
                input_sentence_size=_SP_INPUT_SENTENCES,
                shuffle_input_sentence=True,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
                **_SP_SPECIAL,
            )
        except RuntimeError as e:
            raise ValueError(
                f"SentencePiece training failed (vocab_size={vocab_size}, "
                f"model_type={model_type!r}): {e}"
            ) from e
        tokenizer = cls(model.getvalue(), kind=f"sentencepiece_{model_type}")
        if workdir is not None:
            tokenizer.save(workdir)
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def pad_id(self) -> int:
        return self.processor.pad_id()

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.processor.decode(_in_vocab(ids, self.vocab_size, self.processor.unk_id()))

    def save(self, directory: str | os.PathLike) -> None:
        path = pathlib.Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / SENTENCEPIECE_MODEL).write_bytes(self.model_proto)
        _write_manifest(path, {"kind": self.kind, "model_file": SENTENCEPIECE_MODEL})


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Restores a tokenizer written by its `save`, whatever its kind."""
    path = pathlib.Path(directory)
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(f"no tokenizer saved in {path}: {MANIFEST} is missing")
    manifest = json.loads(manifest_path.read_text())
    kind = manifest.get("kind")
    if kind == "char":
        return CharTokenizer(manifest["chars"])
    if kind == "byte":
        return ByteTokenizer()
    if kind in ("sentencepiece_bpe", "sentencepiece_unigram"):
        return SentencePieceTokenizer((path / manifest["model_file"]).read_bytes(), kind=kind)
    raise ValueError(f"{manifest_path} names tokenizer kind {kind!r}; known: {TOKENIZER_KINDS}")


def build_tokenizer(
    kind: str,
    train_texts: Iterable[str],
    vocab_size: int,
    workdir: str | os.PathLike | None = None,
) -> Tokenizer:
    """Builds a tokenizer of the given kind from the training texts.

    Args:
      kind: one of TOKENIZER_KINDS.
      train_texts: the training documents (never the validation ones).
      vocab_size: used by the SentencePiece kinds only; "char" takes its vocabulary
        from the text and "byte" always has 256.
      workdir: if given, the tokenizer is saved there.

    Returns:
      The tokenizer.
    """
    if kind == "char":
        tokenizer = CharTokenizer.from_text("".join(train_texts))
    elif kind == "byte":
        tokenizer = ByteTokenizer()
    elif kind in ("sentencepiece_bpe", "sentencepiece_unigram"):
        model_type = kind.removeprefix("sentencepiece_")
        tokenizer = SentencePieceTokenizer.train(train_texts, vocab_size, model_type)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {TOKENIZER_KINDS}")
    if workdir is not None:
        tokenizer.save(workdir)
    return tokenizer
