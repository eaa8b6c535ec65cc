"""`load_pretrained`: one entry point for real weights, from the registry, GGUF or Hugging Face.

    from models import load_pretrained
    lm = load_pretrained("smollm2-135m-instruct")        # registry name
    lm = load_pretrained("path/to/model.Q4_K.gguf")        # a GGUF file
    lm = load_pretrained("path/to/hf_checkpoint_dir")      # config.json + safetensors
    lm.model(ids) -> logits;  lm.tokenizer.encode(text);  lm.config

A decoder comes back as a `LanguageModel`; a BERT sentence embedder as a `SentenceEmbedder`
whose `embed(texts)` gives unit vectors as sentence-transformers computes them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import gguf, hf, hub
from models.config import ModelConfig
from models.encoder import l2_normalize, length_buckets, pool
from models.tokenizer import Tokenizer

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(eq=False)
class LanguageModel:
    """A pretrained decoder with its tokenizer.

    Attributes:
      model: the `models.Decoder`; `model(ids [B, T])` -> float32 logits [B, T, V].
      tokenizer: encode/decode/apply_chat_template.
      config: the `ModelConfig` the trainer uses too.
      model_type: the Hugging Face architecture name ("llama", "qwen2", "gpt2").
      source: the file or directory the weights came from.
      gguf_file: for GGUF sources, the file with its tensors in their quantized form (for
        weight-only quantized inference); None otherwise.
    """

    model: nnx.Module
    tokenizer: Tokenizer
    config: ModelConfig
    model_type: str
    source: pathlib.Path
    gguf_file: gguf.GGUFFile | None = None

    def save_pretrained(self, path: str | os.PathLike, **kwargs: Any) -> pathlib.Path:
        """Writes a Hugging Face dir (safetensors, config.json, tokenizer files)."""
        extra = {"bos_token_id": self.tokenizer.bos_id, "eos_token_id": self.tokenizer.eos_id}
        extra = {k: v for k, v in extra.items() if v is not None}
        return hf.save_hf_dir(
            self.model, path, tokenizer=self.tokenizer, extra_config=extra, **kwargs
        )


@dataclasses.dataclass(eq=False)
class SentenceEmbedder:
    """A BERT-style encoder with its pooling, as sentence-transformers defines the model.

    Attributes:
      model: the `models.Encoder`.
      tokenizer: the WordPiece (or other) tokenizer; adds [CLS]/[SEP].
      config: the `ModelConfig`.
      pooling: "mean", "cls" or "max".
      normalize: return unit vectors.
      max_seq_len: texts are truncated to this many tokens.
      source: the directory the weights came from.
    """

    model: nnx.Module
    tokenizer: Tokenizer
    config: ModelConfig
    pooling: str
    normalize: bool
    max_seq_len: int
    source: pathlib.Path

    @property
    def dim(self) -> int:
        return self.config.embed_dim

    @functools.cached_property
    def _encode(self):
        graphdef, state = nnx.split(self.model)
        pooling, normalize = self.pooling, self.normalize

        @jax.jit
        def encode(state, ids, mask):
            hidden = nnx.merge(graphdef, state)(ids, mask)
            vectors = pool(hidden, mask, pooling)
            return l2_normalize(vectors) if normalize else vectors

        return functools.partial(encode, state)

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Embeds texts: [n] strings -> float32 [n, dim] (unit vectors when normalize)."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a list of strings; wrap a single text in a list")
        out = np.zeros((len(texts), self.dim), np.float32)
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start : start + batch_size])
            ids, mask = self.tokenizer.encode_batch(batch, max_length=self.max_seq_len)
            # Pad rows and length to buckets so a handful of shapes is compiled, not one per batch.
            length = min(int(length_buckets([ids.shape[1]])[0]), self.config.max_seq_len)
            rows = batch_size if len(texts) > batch_size else len(batch)
            padded_ids = np.full((rows, length), self.tokenizer.pad_id or 0, np.int32)
            padded_mask = np.zeros((rows, length), np.int32)
            padded_ids[: len(batch), : ids.shape[1]] = ids
            padded_mask[: len(batch), : ids.shape[1]] = mask
            padded_mask[len(batch) :, 0] = 1  # filler rows: one token, so no division by 0
            vectors = self._encode(jnp.asarray(padded_ids), jnp.asarray(padded_mask))
            out[start : start + len(batch)] = np.asarray(vectors)[: len(batch)]
        return out


def _overrides(dtype: str, param_dtype: str | None, max_seq_len: int | None) -> dict[str, Any]:
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        if value is not None and value not in DTYPES:
            raise ValueError(f"{name}={value!r} is not one of {DTYPES}")
    values: dict[str, Any] = {"dtype": dtype, "param_dtype": param_dtype or dtype}
    if max_seq_len is not None:
        values["max_seq_len"] = max_seq_len
    return values


def _resolve(name_or_path: str | os.PathLike) -> pathlib.Path:
    name = os.fspath(name_or_path)
    if name in hub.REGISTRY:
        return hub.fetch_registered(name)
    path = pathlib.Path(name).expanduser()
    if path.exists():
        return path
    raise ValueError(
        f"unknown model {name!r}: not a registered name ({sorted(hub.REGISTRY)}), and no such "
        "file or directory (a .gguf file or a Hugging Face dir with config.json)"
    )


def _load_gguf(path: pathlib.Path, overrides: dict[str, Any]) -> LanguageModel:
    file = gguf.read_gguf(path)
    hf_config = gguf.hf_config_from_gguf(file)
    model_type, cfg = hf.config_from_hf(hf_config, **overrides)
    tensors = gguf.hf_state_dict_from_gguf(file)
    model = hf.from_hf_tensors(model_type, cfg, tensors, str(path))
    tokenizer = Tokenizer.from_gguf_metadata(file.metadata)
    return LanguageModel(model, tokenizer, cfg, model_type, path, gguf_file=file)


def _sentence_transformers_settings(path: pathlib.Path) -> tuple[str, bool, int | None]:
    """(pooling, normalize, max_seq_length) from a sentence-transformers dir's module files."""
    modules_file = path / "modules.json"
    if not modules_file.exists():
        return "mean", False, None  # a plain BERT dir: mean pooling, raw vectors
    modules = json.loads(modules_file.read_text())
    pooling, normalize = "mean", False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            settings = json.loads((path / module["path"] / "config.json").read_text())
            modes = [m for m in ("cls", "mean", "max") if settings.get(f"pooling_mode_{m}_token")]
            modes += ["mean"] if settings.get("pooling_mode_mean_tokens") else []
            modes += ["max"] if settings.get("pooling_mode_max_tokens") else []
            if len(set(modes)) != 1:
                raise ValueError(f"{path}: unsupported pooling settings {settings}")
            pooling = modes[0]
        elif kind.endswith("Normalize"):
            normalize = True
        elif not kind.endswith("Transformer"):
            raise ValueError(f"{path}: unsupported sentence-transformers module {kind!r}")
    max_len = None
    bert_config = path / "sentence_bert_config.json"
    if bert_config.exists():
        max_len = json.loads(bert_config.read_text()).get("max_seq_length")
    return pooling, normalize, max_len


def _load_hf(path: pathlib.Path, overrides: dict[str, Any]) -> LanguageModel | SentenceEmbedder:
    model_type, model, hf_config = hf.load_hf_dir(path, **overrides)
    tokenizer = Tokenizer.from_hf_dir(path)
    cfg = model.cfg
    if model_type == "bert":
        pooling, normalize, max_len = _sentence_transformers_settings(path)
        max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        return SentenceEmbedder(model, tokenizer, cfg, pooling, normalize, max_len, path)
    return LanguageModel(model, tokenizer, cfg, model_type, path)


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    max_seq_len: int | None = None,
    quant: str = "none",
    quant_group_size: int | None = 128,
) -> LanguageModel | SentenceEmbedder:
    """Loads real weights and their tokenizer.

    Args:
      name_or_path: a registry name (`models.hub.REGISTRY`: "smollm2-135m-instruct",
        "all-minilm-l6-v2"), fetched into the cache on first use; a path to a .gguf file
        (quantized tensors are dequantized; the file stays available as `lm.gguf_file`); or a
        Hugging Face checkpoint dir (config.json, safetensors, tokenizer.json).
      dtype: compute dtype, "float32" (use it for fidelity checks) or "bfloat16".
      param_dtype: parameter storage dtype; defaults to `dtype`.
      max_seq_len: override the context length (e.g. to keep caches small).
      quant: weight-only quantization of the projections (models/quantize.py): "none", "int8",
        "int4", or "gguf" (a GGUF file's Q4_0/Q4_1/Q8_0 blocks used as they are, no
        requantization).
      quant_group_size: rows per scale for "int8"/"int4" (None: per channel, int8 only).

    Returns:
      A `LanguageModel` for decoders, a `SentenceEmbedder` for BERT-style encoders.

    Raises:
      ValueError: an unknown name or path; CheckpointError / GGUFError naming what is wrong.
    """
    overrides = _overrides(dtype, param_dtype, max_seq_len)
    if quant not in ("none", "int8", "int4", "gguf"):
        raise ValueError(f"quant={quant!r} is not one of ('none', 'int8', 'int4', 'gguf')")
    path = _resolve(name_or_path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a file must be a .gguf; for Hugging Face pass its dir")
        loaded = _load_gguf(path, overrides)
    elif quant == "gguf":
        raise ValueError(f"quant='gguf' needs a .gguf file, got the directory {path}")
    else:
        loaded = _load_hf(path, overrides)
    if quant != "none":
        from models import quantize

        if quant == "gguf":
            quantize.load_gguf_blocks(loaded.model, loaded.gguf_file)
        else:
            quantize.quantize(loaded.model, quant, quant_group_size)
        loaded.config = loaded.model.cfg
    return loaded
