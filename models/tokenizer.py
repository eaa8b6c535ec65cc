"""The tokenizers of pretrained models: Hugging Face `tokenizers` plus jinja2 chat templates.

`Tokenizer.from_hf_dir` loads a Hugging Face tokenizer dir; `Tokenizer.from_gguf_metadata`
rebuilds the byte-level BPE tokenizer a GGUF file describes. Chat templates render exactly as
transformers' `apply_chat_template` renders them, and `StreamDecoder` turns sampled ids into text
one token at a time.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import jinja2.utils
import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where newer transformers versions save the template

# The special tokens a chat template may refer to by name ({{ bos_token }}), as in transformers.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
)

# Tokens that chat templates write to end a turn. One of them that the template uses stops
# generation alongside eos (a base model's eos is often <|endoftext|>, its chat turns end with
# <|im_end|>).
TURN_END_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
)

# GGUF token types (llama.cpp's llama_token_type).
GGUF_CONTROL = 3
GGUF_USER_DEFINED = 4

# Pre-tokenizer splits of the byte-level BPE tokenizers llama.cpp names in `tokenizer.ggml.pre`,
# as the models' own tokenizer.json files write them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pipeline() -> tuple[None, pre_tokenizers.PreTokenizer, bool]:
    # ByteLevel's own regex is GPT-2's: 's|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False


def _smollm_pipeline() -> tuple[None, pre_tokenizers.PreTokenizer, bool]:
    # SmolLM/SmolLM2's tokenizer.json (and llama.cpp's "smollm": \p{N} first, then GPT-2's
    # regex): every numeric character is its own piece before the GPT-2 split.
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return None, pre, False


def _split_pipeline(split: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _llama3_pipeline() -> tuple[None, pre_tokenizers.PreTokenizer, bool]:
    # Llama 3's tokenizer.json has ignore_merges=true (a word in the vocabulary is one token
    # whatever the merges say), and so does llama.cpp for "llama-bpe".
    return None, _split_pipeline(_LLAMA3_SPLIT), True


def _qwen2_pipeline() -> tuple[normalizers.Normalizer, pre_tokenizers.PreTokenizer, bool]:
    # Qwen2's tokenizer.json normalizes to NFC first.
    return normalizers.NFC(), _split_pipeline(_QWEN2_SPLIT), False


# `tokenizer.ggml.pre` -> (normalizer, pre-tokenizer, BPE ignore_merges). "default" is what
# llama.cpp assumes for a file without the key; like transformers we treat it as GPT-2 (llama.cpp
# itself then splits punctuation runs first, and warns that quality is degraded).
GGUF_PRE_TOKENIZERS = {
    "gpt-2": _gpt2_pipeline,
    "default": _gpt2_pipeline,
    "smollm": _smollm_pipeline,
    "llama-bpe": _llama3_pipeline,
    "qwen2": _qwen2_pipeline,
}
# Files that say nothing about BOS: llama.cpp adds it for Llama 3's vocabulary only.
_GGUF_ADD_BOS_DEFAULT = {"llama-bpe": True}


class ChatTemplateError(ValueError):
    """A chat template rejected the conversation (its `raise_exception(...)` was called)."""


class Tokenizer:
    """A pretrained model's tokenizer: encode, decode, batch, chat templates and streaming.

    `encode(text, add_special_tokens=True)` adds, in order: what the tokenizer.json post-processor
    adds (BERT's [CLS] ... [SEP], Llama 3's <|begin_of_text|>; a GGUF tokenizer has none), then
    BOS in front when `add_bos_token` is set (tokenizer_config.json or
    `tokenizer.ggml.add_bos_token`) and EOS at the end when `add_eos_token` is set, each unless the
    post-processor already put it there. Special tokens written in the text ("<|im_start|>") are
    always matched as their ids, with or without `add_special_tokens`.

    Attributes:
      vocab_size: number of ids, added tokens included.
      bos_id / eos_id / pad_id / unk_id: special token ids, None when the tokenizer has none.
      chat_template: the jinja2 source of the default chat template, or None.
      stop_ids: ids that end a generation: eos, plus the token the chat template ends a turn
        with (<|im_end|>, <|eot_id|>, ...) when it differs.
      special_tokens: special token strings by name ("bos_token": "<|im_start|>"), the variables
        a chat template sees.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        chat_template: str | Mapping[str, str] | None = None,
        vocab_size: int | None = None,
    ):
        """Wraps a `tokenizers.Tokenizer` (its truncation and padding are switched off).

        Args:
          backend: the Hugging Face tokenizer.
          special_tokens: token strings by name, from SPECIAL_TOKEN_NAMES.
          add_bos_token / add_eos_token: what `encode(add_special_tokens=True)` adds besides the
            post-processor's tokens.
          chat_template: a jinja2 template, or named templates ({"default": ..., "tool_use": ...}).
          vocab_size: the number of ids, if the backend's count is not it (duplicate GGUF tokens).
        """
        self._backend = backend
        # Encode and batch do their own truncation and padding; settings saved in tokenizer.json
        # (MiniLM's pads everything to 128) must not leak into them.
        backend.no_truncation()
        backend.no_padding()
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.vocab_size = vocab_size or backend.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._special_id("bos_token")
        self.eos_id = self._special_id("eos_token")
        self.pad_id = self._special_id("pad_token")
        self.unk_id = self._special_id("unk_token")
        if isinstance(chat_template, Mapping):
            self._chat_templates = dict(chat_template)
        else:
            self._chat_templates = {"default": chat_template} if chat_template else {}
        self.chat_template = self._chat_templates.get("default")
        self._compiled: dict[str, jinja2.Template] = {}
        # encode("", add_special_tokens=True): how many ids encode adds around the text.
        self._num_special = len(self._finish(backend.encode("", add_special_tokens=False)))
        self.stop_ids = self._find_stop_ids()

    # ----------------------------------------------------------------------------------------
    # Loading.

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads tokenizer.json, with tokenizer_config.json and special_tokens_map.json if present.

        The chat template comes from chat_template.jinja, else tokenizer_config.json.

        Raises:
          FileNotFoundError: the dir has no tokenizer.json.
          ValueError: a file is malformed (the message names it).
        """
        path = pathlib.Path(path)
        tokenizer_json = path / TOKENIZER_JSON
        if not tokenizer_json.is_file():
            raise FileNotFoundError(
                f"{tokenizer_json} does not exist; a Hugging Face tokenizer dir needs a "
                "tokenizer.json (the fast-tokenizer file)"
            )
        try:
            backend = tokenizers.Tokenizer.from_str(tokenizer_json.read_text(encoding="utf-8"))
        except Exception as e:  # tokenizers raises plain Exception for a bad file.
            raise ValueError(
                f"{tokenizer_json} is not a tokenizer the `tokenizers` library can load: {e}"
            ) from e
        config = _read_json_object(path / TOKENIZER_CONFIG)
        special_map = _read_json_object(path / SPECIAL_TOKENS_MAP)
        special_tokens = {}
        for name in SPECIAL_TOKEN_NAMES:
            value = config.get(name, special_map.get(name))
            if isinstance(value, Mapping):  # a serialized AddedToken
                value = value.get("content")
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{path / TOKENIZER_CONFIG}: {name} is {value!r}, not a string")
            special_tokens[name] = value
        template_file = path / CHAT_TEMPLATE_FILE
        if template_file.is_file():
            chat_template = template_file.read_text(encoding="utf-8")
        else:
            chat_template = config.get("chat_template")
            if isinstance(chat_template, list):  # [{"name": "default", "template": ...}, ...]
                chat_template = {t["name"]: t["template"] for t in chat_template}
        return cls(
            backend,
            special_tokens=special_tokens,
            add_bos_token=bool(config.get("add_bos_token", False)),
            add_eos_token=bool(config.get("add_eos_token", False)),
            chat_template=chat_template,
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Rebuilds the byte-level BPE tokenizer of a GGUF file from its metadata.

        Args:
          metadata: GGUF key -> plain Python value, keys as stored ("tokenizer.ggml.tokens", ...).

        Tokens of type control (3) become special added tokens and user-defined ones (4) plain
        added tokens, so both are matched whole in text, and control tokens are dropped by
        `decode(skip_special_tokens=True)`, as in transformers' GGUF loader and llama.cpp.

        Raises:
          NotImplementedError: `tokenizer.ggml.model` is not "gpt2" (byte-level BPE).
          ValueError: `tokenizer.ggml.pre` is not in GGUF_PRE_TOKENIZERS, or a key is missing.
        """
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise NotImplementedError(
                f"tokenizer.ggml.model={model!r}: only byte-level BPE GGUF tokenizers ('gpt2') "
                "are supported; SentencePiece ('llama') and others are not"
            )
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_TOKENIZERS:
            raise ValueError(
                f"tokenizer.ggml.pre={pre!r} is not a supported pre-tokenizer; supported are "
                f"{sorted(GGUF_PRE_TOKENIZERS)}"
            )
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            if key not in metadata:
                raise ValueError(f"the GGUF metadata has no {key}")
        tokens = [str(t) for t in metadata["tokenizer.ggml.tokens"]]
        merges = []
        for rank, merge in enumerate(metadata["tokenizer.ggml.merges"]):
            pair = str(merge).split(" ")
            if len(pair) != 2:
                raise ValueError(f"tokenizer.ggml.merges[{rank}]={merge!r} is not two tokens")
            merges.append((pair[0], pair[1]))

        normalizer, pre_tokenizer, ignore_merges = GGUF_PRE_TOKENIZERS[pre]()
        # A later duplicate wins, as in llama.cpp's token_to_id.
        vocab = {token: i for i, token in enumerate(tokens)}
        # No unk token: like the models' tokenizer.json, a byte missing from the vocabulary is
        # dropped rather than mapped to <unk>.
        backend = tokenizers.Tokenizer(
            tokenizers.models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges)
        )
        backend.normalizer = normalizer
        backend.pre_tokenizer = pre_tokenizer
        backend.decoder = decoders.ByteLevel()
        types = [int(t) for t in metadata.get("tokenizer.ggml.token_type", ())]
        by_type = {GGUF_CONTROL: [], GGUF_USER_DEFINED: []}
        for i, (token, token_type) in enumerate(zip(tokens, types, strict=False)):
            if token_type in by_type and vocab[token] == i:
                by_type[token_type].append(token)
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in by_type[GGUF_CONTROL]]
        )
        backend.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t in by_type[GGUF_USER_DEFINED]]
        )
        if backend.get_vocab_size(with_added_tokens=True) != len(vocab):
            raise ValueError("GGUF added tokens got ids outside the vocabulary")  # never expected

        def token_for(key: str) -> str | None:
            token_id = metadata.get(f"tokenizer.ggml.{key}")
            if token_id is None:
                return None
            if not 0 <= int(token_id) < len(tokens):
                raise ValueError(f"tokenizer.ggml.{key}={token_id} is outside the vocabulary")
            return tokens[int(token_id)]

        special_tokens = {
            "bos_token": token_for("bos_token_id"),
            "eos_token": token_for("eos_token_id"),
            "unk_token": token_for("unknown_token_id"),
            "pad_token": token_for("padding_token_id"),
        }
        add_bos = metadata.get(
            "tokenizer.ggml.add_bos_token", _GGUF_ADD_BOS_DEFAULT.get(pre, False)
        )
        return cls(
            backend,
            special_tokens=special_tokens,
            add_bos_token=bool(add_bos),
            add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=metadata.get("tokenizer.chat_template"),
            vocab_size=len(tokens),
        )

    # ----------------------------------------------------------------------------------------
    # Encoding and decoding.

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped Hugging Face tokenizer (e.g. to build a Tokenizer with another template)."""
        return self._backend

    def save_hf(self, path: str | os.PathLike) -> None:
        """Writes tokenizer.json and tokenizer_config.json (with the chat template) to `path`.

        transformers loads the dir with AutoTokenizer as a PreTrainedTokenizerFast, and
        `from_hf_dir` reads it back to an equal tokenizer.
        """
        path = pathlib.Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / TOKENIZER_JSON).write_text(self._backend.to_str(), encoding="utf-8")
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            **self.special_tokens,
        }
        if self._chat_templates:
            templates = self._chat_templates
            config["chat_template"] = (
                templates["default"]
                if list(templates) == ["default"]
                else [{"name": k, "template": v} for k, v in templates.items()]
            )
        text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        (path / TOKENIZER_CONFIG).write_text(text, encoding="utf-8")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; see the class docstring for what `add_special_tokens` adds."""
        encoding = self._backend.encode(text, add_special_tokens=False)
        return self._finish(encoding) if add_special_tokens else encoding.ids

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        add_special_tokens: bool = True,
        max_length: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encodes texts into one right-padded batch.

        Args:
          texts: n strings.
          add_special_tokens: as in `encode`.
          max_length: cut each sequence to at most this many ids; the special tokens are kept
            and the text is cut (as transformers' truncation does).

        Returns:
          ids: int32 [n, T], T the longest length, padded with pad_id (else eos_id, else 0).
          mask: int32 [n, T], 1 for real tokens and 0 for padding.
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of strings, not a single string")
        reserved = self._num_special if add_special_tokens else 0
        if max_length is not None and max_length <= reserved:
            raise ValueError(
                f"max_length={max_length} leaves no room for text beside the {reserved} special "
                "tokens added to every sequence"
            )
        rows = []
        for encoding in self._backend.encode_batch(list(texts), add_special_tokens=False):
            ids = encoding.ids
            if max_length is not None:
                ids = ids[: max_length - reserved]
            rows.append(self._finish_ids(ids, encoding) if add_special_tokens else ids)
        length = max((len(r) for r in rows), default=0)
        pad = next((i for i in (self.pad_id, self.eos_id) if i is not None), 0)
        ids = np.full((len(rows), length), pad, dtype=np.int32)
        mask = np.zeros((len(rows), length), dtype=np.int32)
        for row, row_ids in enumerate(rows):
            ids[row, : len(row_ids)] = row_ids
            mask[row, : len(row_ids)] = 1
        return ids, mask

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids` (a list or array); ids outside the vocabulary are dropped."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A decoder to feed sampled ids one at a time; see `StreamDecoder`."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    # ----------------------------------------------------------------------------------------
    # Chat templates.

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> list[int] | str:
        """Renders a conversation with the chat template, as transformers does, and tokenizes it.

        The template sees `messages`, `add_generation_prompt`, the special token strings
        (`bos_token`, `eos_token`, ...), `tools=None`, `documents=None`, and `kwargs`, which
        override any of them. Keys whose value is None are dropped from messages first (as
        transformers does). The text is tokenized without adding special tokens: the template
        writes the ones it wants.

        Args:
          messages: [{"role": "user", "content": "Hi"}, ...]
          add_generation_prompt: end with the header of an assistant turn.
          tokenize: return ids; else the rendered string.
          continue_final_message: end the text right after the last message's content, without
            its end-of-turn, so that the model continues that message (prefilling the start of
            an assistant reply); as transformers does. Excludes add_generation_prompt.
          **kwargs: more template variables, e.g. tools=[...] (JSON schemas).

        Raises:
          ValueError: the tokenizer has no chat template, or `messages` is malformed.
          ChatTemplateError: the template refused the conversation.
        """
        messages = _checked_messages(messages)
        if continue_final_message:
            if add_generation_prompt:
                raise ValueError("continue_final_message and add_generation_prompt exclude each "
                                 "other: pass add_generation_prompt=False")  # fmt: skip
            if not messages or not isinstance(messages[-1].get("content"), str):
                raise ValueError("continue_final_message needs a last message with text content")
        variables = {**self.special_tokens, "tools": None, "documents": None, **kwargs}
        template = self._template(use_tools=variables["tools"] is not None)
        text = template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )
        if continue_final_message:
            final = messages[-1]["content"].strip()
            end = text.rfind(final)
            if not final or end < 0:
                raise ValueError("the chat template does not render the last message's content "
                                 "verbatim, so it cannot be continued")  # fmt: skip
            text = text[: end + len(final)]
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _template(self, use_tools: bool) -> jinja2.Template:
        if not self._chat_templates:
            raise ValueError(
                "this tokenizer has no chat template (none in tokenizer_config.json, "
                "chat_template.jinja or the GGUF's tokenizer.chat_template); it is probably a "
                "base model, so format prompts as plain text"
            )
        if use_tools and "tool_use" in self._chat_templates:
            name = "tool_use"
        elif "default" in self._chat_templates:
            name = "default"
        else:
            raise ValueError(
                f"no 'default' chat template among the named ones {sorted(self._chat_templates)}"
            )
        if name not in self._compiled:
            self._compiled[name] = _chat_template_env().from_string(self._chat_templates[name])
        return self._compiled[name]

    # ----------------------------------------------------------------------------------------
    # Helpers.

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)

    def _finish(self, encoding: tokenizers.Encoding) -> list[int]:
        return self._finish_ids(encoding.ids, encoding)

    def _finish_ids(self, ids: list[int], encoding: tokenizers.Encoding) -> list[int]:
        """Adds the special tokens to the text ids `ids` (a prefix of `encoding`'s)."""
        if self._backend.post_processor is not None:
            if len(ids) < len(encoding.ids):
                encoding.truncate(len(ids))
            ids = self._backend.post_process(encoding, add_special_tokens=True).ids
        if self.add_bos_token and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        if self.add_eos_token and self.eos_id is not None and ids[-1:] != [self.eos_id]:
            ids = [*ids, self.eos_id]
        return list(ids)

    def _find_stop_ids(self) -> frozenset[int]:
        stop = {self.eos_id} if self.eos_id is not None else set()
        for source in self._chat_templates.values():
            for token in TURN_END_TOKENS:
                token_id = self._backend.token_to_id(token)
                if token in source and token_id is not None:
                    stop.add(token_id)
        return frozenset(stop)


class StreamDecoder:
    """Turns ids sampled one at a time into text, emitting only what is complete.

    A byte-level token can hold part of a character (an emoji is four bytes and often four
    tokens), and some decoders change a token's text by what precedes it (WordPiece's "##").
    `push` therefore decodes a window that starts a token or so before the new ids, emits the
    text that the new ids add to it, and holds it back while it ends in an incomplete character
    (U+FFFD). The pieces returned by `push` and `flush` concatenate to `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # The window starts here: text before it is settled.
        self._read_offset = 0  # Ids before this have had their text emitted.
        self._emitted: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Adds one id; returns the newly completed text, possibly ""."""
        self._ids.append(int(token_id))
        before = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        piece = text[len(before) :]
        self._emitted.append(piece)
        return piece

    def flush(self) -> str:
        """Returns the text still held back (e.g. a truly invalid byte at the end)."""
        emitted = "".join(self._emitted)
        full = self._decode(self._ids)
        if full.startswith(emitted):
            rest = full[len(emitted) :]
        else:  # Not expected for the decoders we know; emit what the window adds.
            before = self._decode(self._ids[self._prefix_offset : self._read_offset])
            rest = self._decode(self._ids[self._prefix_offset :])[len(before) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._emitted = [emitted + rest]
        return rest


# ------------------------------------------------------------------------------------------------
# transformers' chat template environment.


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"the chat template refused the conversation: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja2's own tojson escapes HTML characters (<, >, &, '), which chat templates must not.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja2's namespace(), refusing underscore names (no way into Python internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_'")


def _chat_template_env() -> jinja2.Environment:
    """The environment of transformers' `_compile_jinja_template` (chat templates are untrusted)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    return env


def _checked_messages(messages: Any) -> list[dict[str, Any]]:
    """Validates a conversation and drops None-valued keys, as transformers does."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(
            f"messages must be a list of dicts like {{'role': 'user', 'content': 'Hi'}}, got "
            f"{type(messages).__name__}"
        )
    if not messages:
        raise ValueError("messages is empty; a chat template needs at least one message")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] is a {type(message).__name__}, not a dict")
        message = {k: v for k, v in message.items() if v is not None}
        if not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}] has no string 'role': {message!r}")
        content = message.get("content")
        # An assistant message that only calls tools may have no content.
        if not isinstance(content, str) and not (content is None and "tool_calls" in message):
            raise ValueError(f"messages[{i}] has no string 'content': {message!r}")
        checked.append(message)
    return checked


def _read_json_object(path: pathlib.Path) -> dict[str, Any]:
    """The JSON object in `path`, {} when there is no such file."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, not a JSON object")
    return value
