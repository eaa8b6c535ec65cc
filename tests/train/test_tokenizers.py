"""Tests for train/tokenizers.py: round trips, unknowns, and save/load for every kind."""

import numpy as np
import pytest

from train import tokenizers

TRICKY = (
    "  Leading spaces,\n\n\nblank lines,   runs of spaces,\ttabs, caf\u00e9 \u2014 \U0001f600 end  "
)


@pytest.fixture(scope="module")
def synthetic_texts():
    """Pseudo-English lines from a fixed generator: enough text to train small models offline."""
    rng = np.random.default_rng(0)
    syllables = ["the", "an", "ing", "to", "be", "or", "not", "thou", "art", "king", "lo", "ve"]
    lines = []
    for _ in range(3000):
        words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(8)]
        lines.append(" ".join(words).capitalize() + rng.choice([".", ",", "!", "?"]))
    return ["\n".join(lines[:1500]), "\n".join(lines[1500:])]


@pytest.fixture(scope="module")
def shakespeare_bpe(shakespeare_corpus):
    return tokenizers.SentencePieceTokenizer.train(
        [d.text for d in shakespeare_corpus.train], vocab_size=512, model_type="bpe"
    )


def test_char_round_trip_and_unknown():
    tok = tokenizers.CharTokenizer.from_text("hello world\n")
    assert tok.vocab_size == len(set("hello world\n")) + 1 and tok.eos_id is None
    ids = tok.encode("hello\nworld")
    assert tok.decode(ids) == "hello\nworld" and min(ids) >= 1
    ids = tok.encode("hex!")
    assert ids[2] == ids[3] == tokenizers.CharTokenizer.UNK_ID
    assert tok.decode(ids) == "he\ufffd\ufffd"
    np.testing.assert_array_equal(tok.encode_array("hello"), tok.encode("hello"))


def test_byte_round_trip():
    tok = tokenizers.ByteTokenizer()
    ids = tok.encode(TRICKY)
    assert tok.vocab_size == 256 and max(ids) < 256 and len(ids) == len(TRICKY.encode())
    assert tok.decode(ids) == TRICKY
    assert tok.decode(ids[:-5] + [0xF0]).endswith("\ufffd")  # Half a character decodes.


def test_ids_beyond_the_vocabulary_decode_as_replacement(synthetic_texts):
    # A model with a padded vocabulary can sample them; a sample must not crash.
    assert tokenizers.ByteTokenizer().decode([65, 256, -1, 66]) == "A\ufffd\ufffdB"
    char = tokenizers.CharTokenizer.from_text("ab")
    assert char.decode([1, 99, 2]) == "a\ufffdb"
    sp = tokenizers.build_tokenizer("sentencepiece_bpe", synthetic_texts, vocab_size=400)
    assert sp.decode(sp.encode("be") + [400] + sp.encode("or")) == "be\ufffdor"


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match="'wordpiece'.*char.*byte.*sentencepiece_bpe"):
        tokenizers.build_tokenizer("wordpiece", ["text"], 100)


@pytest.mark.parametrize("kind", ["sentencepiece_bpe", "sentencepiece_unigram"])
def test_sentencepiece_round_trip_offline(kind, synthetic_texts, tmp_path):
    tok = tokenizers.build_tokenizer(kind, synthetic_texts, vocab_size=400, workdir=tmp_path)
    assert tok.kind == kind and tok.vocab_size == 400
    assert (tok.pad_id, tok.eos_id) == (0, 3) and tok.encode("\n") == [4]
    for text in [synthetic_texts[1], TRICKY]:
        assert tok.decode(tok.encode(text)) == text
    # A sentence of pseudo-words should be fewer pieces than characters.
    assert len(tok.encode(synthetic_texts[1])) < 0.6 * len(synthetic_texts[1])


def test_sentencepiece_vocab_too_small_is_clear(synthetic_texts):
    with pytest.raises(ValueError, match="vocab_size=200 leaves no room"):
        tokenizers.SentencePieceTokenizer.train(synthetic_texts, vocab_size=200)


@pytest.mark.data
def test_sentencepiece_round_trip_on_shakespeare(shakespeare_bpe, shakespeare_corpus):
    for doc in shakespeare_corpus.val:  # Held-out plays: text the model never saw.
        ids = shakespeare_bpe.encode(doc.text)
        assert shakespeare_bpe.decode(ids) == doc.text
        assert len(ids) < 0.7 * len(doc.text)
    assert shakespeare_bpe.decode(shakespeare_bpe.encode(TRICKY)) == TRICKY


def _saved_and_loaded(tok, directory):
    tok.save(directory)
    restored = tokenizers.load_tokenizer(directory)
    assert type(restored) is type(tok) and restored.kind == tok.kind
    assert (restored.vocab_size, restored.eos_id) == (tok.vocab_size, tok.eos_id)
    return restored


def test_save_load_char_and_byte(tmp_path, synthetic_texts):
    text = synthetic_texts[0]
    for tok in [tokenizers.CharTokenizer.from_text(text), tokenizers.ByteTokenizer()]:
        restored = _saved_and_loaded(tok, tmp_path / tok.kind)
        assert restored.encode(TRICKY) == tok.encode(TRICKY)
        assert restored.encode(text) == tok.encode(text)


def test_save_load_sentencepiece(tmp_path, synthetic_texts):
    tok = tokenizers.build_tokenizer("sentencepiece_unigram", synthetic_texts, vocab_size=400)
    restored = _saved_and_loaded(tok, tmp_path)
    assert restored.encode(synthetic_texts[1]) == tok.encode(synthetic_texts[1])


@pytest.mark.data
def test_save_load_shakespeare_bpe(shakespeare_bpe, shakespeare_corpus, tmp_path):
    restored = _saved_and_loaded(shakespeare_bpe, tmp_path)
    text = shakespeare_corpus.val[0].text
    assert restored.encode(text) == shakespeare_bpe.encode(text)


def test_load_without_manifest_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        tokenizers.load_tokenizer(tmp_path)
