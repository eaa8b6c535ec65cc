"""Reading GGUF files (llama.cpp's format): metadata, quantized tensors, and their Hugging Face form.

`read_gguf` memory-maps a file with `gguf.GGUFReader` and keeps every tensor in its stored,
possibly quantized, form (`GGUFTensor.raw` + `ggml_type`) for int4/int8 kernels; `dequantize` is
our own vectorised numpy decoder of the block formats. `hf_config_from_gguf` and
`hf_state_dict_from_gguf` give the `config.json` dict and the tensors a Hugging Face Llama / Qwen 2
checkpoint would have, so the existing Hugging Face loaders can take a GGUF file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import GGUFReader

_MAGIC = b"GGUF"


class GGUFError(ValueError):
    """A GGUF file that cannot be read or converted; the message names the file and the problem."""


# ------------------------------------------------------------------------------------------------
# Block formats. Layouts from ggml-common.h: every quantized row is a run of blocks, each block
# `type_size` bytes holding `block_size` values. A decoder maps blocks [n, type_size] uint8 to
# values [n, block_size] float32, in the same float32 operation order as ggml's reference code.


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 stored at byte `start` of each block, as float32 [n, 1]."""
    return blocks[:, start : start + 2].view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[..., m] bytes -> [..., 2m] 4-bit values: all low nibbles, then all high nibbles."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _decode_f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float32).copy()


def _decode_f16(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float16).astype(np.float32)


def _decode_bf16(blocks: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32.
    return (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _decode_q8_0(blocks: np.ndarray) -> np.ndarray:
    # d: f16, q: int8[32]; x = d * q.
    return _f16(blocks, 0) * blocks[:, 2:].view(np.int8).astype(np.float32)


def _decode_q4_0(blocks: np.ndarray) -> np.ndarray:
    # d: f16, q: 16 bytes of 4-bit values (value j in the low nibble of byte j, value j + 16 in
    # its high nibble); x = d * (q - 8).
    q = _nibbles(blocks[:, 2:]).astype(np.float32) - 8
    return _f16(blocks, 0) * q


def _decode_q4_1(blocks: np.ndarray) -> np.ndarray:
    # d: f16, m: f16, q: as Q4_0 but unsigned; x = d * q + m.
    q = _nibbles(blocks[:, 4:]).astype(np.float32)
    return _f16(blocks, 0) * q + _f16(blocks, 2)


def _q4_k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes [n, 12] -> eight 6-bit scales and eight 6-bit mins, each [n, 8].

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same
    for the mins; bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high nibble).
    """
    sc_lo, mn_lo, rest = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([sc_lo & 0x3F, (rest & 0x0F) | ((sc_lo >> 6) << 4)], axis=-1)
    mins = np.concatenate([mn_lo & 0x3F, (rest >> 4) | ((mn_lo >> 6) << 4)], axis=-1)
    return scales, mins


def _decode_q4_k(blocks: np.ndarray) -> np.ndarray:
    # d: f16, dmin: f16, 12 bytes of sub-block scales/mins, 128 bytes of 4-bit values. Eight
    # sub-blocks of 32; bytes [32c, 32c + 32) hold sub-block 2c (low nibbles), 2c + 1 (high).
    # x = (d * scale_s) * q - dmin * min_s.
    n = blocks.shape[0]
    scales, mins = _q4_k_scales(blocks[:, 4:16])
    d = (_f16(blocks, 0) * scales.astype(np.float32))[:, :, None]
    m = (_f16(blocks, 2) * mins.astype(np.float32))[:, :, None]
    q = _nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).astype(np.float32)
    return (d * q - m).reshape(n, 256)


def _decode_q6_k(blocks: np.ndarray) -> np.ndarray:
    # ql: 128 bytes (low 4 bits), qh: 64 bytes (high 2 bits), scales: int8[16], d: f16. Two halves
    # of 128 values; in half h, value 32k + l (k < 4, l < 32) has its low bits in nibble k // 2 of
    # ql[64h + 32(k % 2) + l] and its high bits at bit 2k of qh[32h + l].
    # x = (d * scale_{value // 16}) * (q - 32).
    n = blocks.shape[0]
    low = _nibbles(blocks[:, :128].reshape(n, 2, 64))  # [n, 2, 128]
    shifts = np.array([0, 2, 4, 6], np.uint8)[:, None]
    high = ((blocks[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 0x03).reshape(n, 2, 128)
    q = ((low | (high << 4)).astype(np.int8) - 32).astype(np.float32).reshape(n, 16, 16)
    d = _f16(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32)
    return (d[:, :, None] * q).reshape(n, 256)


@dataclasses.dataclass(frozen=True)
class _BlockFormat:
    block_size: int  # values per block
    type_size: int  # bytes per block
    decode: Callable[[np.ndarray], np.ndarray]


_FORMATS: dict[str, _BlockFormat] = {
    "F32": _BlockFormat(1, 4, _decode_f32),
    "F16": _BlockFormat(1, 2, _decode_f16),
    "BF16": _BlockFormat(1, 2, _decode_bf16),
    "Q8_0": _BlockFormat(32, 34, _decode_q8_0),
    "Q4_0": _BlockFormat(32, 18, _decode_q4_0),
    "Q4_1": _BlockFormat(32, 20, _decode_q4_1),
    "Q4_K": _BlockFormat(256, 144, _decode_q4_k),
    "Q6_K": _BlockFormat(256, 210, _decode_q6_k),
}
SUPPORTED_TYPES: tuple[str, ...] = tuple(_FORMATS)


def dequantize(raw: np.ndarray, ggml_type: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decodes a tensor's stored bytes into float32 values.

    Args:
      raw: the bytes as stored in the file (any dtype; read as contiguous bytes).
      ggml_type: the ggml type name, one of SUPPORTED_TYPES (e.g. "Q4_1").
      shape: the tensor's shape in row-major order (ggml's ne reversed); blocks run along the
        last axis, so shape[-1] must be a multiple of the type's block size.

    Returns:
      float32 array of `shape`.

    Raises:
      GGUFError: the type is not supported, or `raw` does not hold `shape` in that type.
    """
    fmt = _FORMATS.get(ggml_type)
    if fmt is None:
        raise GGUFError(
            f"tensor type {ggml_type} is not supported; supported types are "
            f"{', '.join(SUPPORTED_TYPES)}"
        )
    shape = tuple(int(s) for s in shape)
    if shape and shape[-1] % fmt.block_size:
        raise GGUFError(
            f"{ggml_type} stores rows in blocks of {fmt.block_size} values, but shape {shape} has "
            f"rows of {shape[-1]}"
        )
    num_blocks = math.prod(shape) // fmt.block_size
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if data.size != num_blocks * fmt.type_size:
        raise GGUFError(
            f"a {ggml_type} tensor of shape {shape} takes {num_blocks * fmt.type_size} bytes, "
            f"got {data.size}"
        )
    return fmt.decode(data.reshape(num_blocks, fmt.type_size)).reshape(shape)


# ------------------------------------------------------------------------------------------------
# Reading a file.


@dataclasses.dataclass
class GGUFTensor:
    """One tensor of a GGUF file, kept in its stored (possibly quantized) form.

    Attributes:
      name: the GGUF tensor name, e.g. "blk.0.attn_q.weight".
      ggml_type: the ggml type name, e.g. "Q4_1".
      shape: row-major shape (ggml's ne reversed): a weight is [out_features, in_features].
      raw: the stored bytes, uint8 (a view into the file's memory map).
      path: the file it came from, for error messages.
    """

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    raw: np.ndarray
    path: pathlib.Path | None = None

    def dequantize(self, dtype: npt.DTypeLike = np.float32) -> np.ndarray:
        """The tensor's values as an array of `shape` and `dtype`."""
        try:
            values = dequantize(self.raw, self.ggml_type, self.shape)
        except GGUFError as e:
            where = f"{self.path}: " if self.path else ""
            raise GGUFError(f"{where}tensor {self.name!r}: {e}") from None
        return values.astype(dtype, copy=False)


@dataclasses.dataclass
class GGUFFile:
    """A parsed GGUF file: its metadata as plain Python values and its tensors by GGUF name."""

    path: pathlib.Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]

    @property
    def architecture(self) -> str:
        if "general.architecture" not in self.metadata:
            raise GGUFError(f"{self.path}: metadata key 'general.architecture' is missing")
        return self.metadata["general.architecture"]


class _PastEnd(Exception):
    def __init__(self, end: int):
        super().__init__(end)
        self.end = end


class _BoundsCheckedReader(GGUFReader):
    """GGUFReader that reports reads past the end of the file instead of failing obscurely.

    The stock reader slices its memory map, so a truncated file yields short arrays and later a
    numpy reshape or index error. Here a short header read raises `_PastEnd`; a short tensor-data
    read (after `data_offset` is set) returns a zero placeholder so the reader can list every tensor, and
    `read_gguf` then names the tensors whose bytes lie past the end.
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > len(self.data):
            if not hasattr(self, "data_offset"):
                raise _PastEnd(end)
            return np.broadcast_to(np.zeros(1, dtype), (int(count),))  # no allocation
        return super()._get(offset, dtype, count, override_order)


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parses a GGUF file's metadata and tensor index; tensor data stays memory-mapped.

    Raises:
      GGUFError: the file is missing, not GGUF, truncated (the message names the first tensor
        that is cut) or otherwise unreadable.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        magic = fh.read(len(_MAGIC))
    if magic != _MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (it starts with {magic!r}, not {_MAGIC!r})")
    try:
        reader = _BoundsCheckedReader(path)
    except _PastEnd as e:
        raise GGUFError(
            f"{path}: file is truncated: its header runs to at least byte {e.end} but the file "
            f"has {size} bytes"
        ) from None
    except (OSError, ValueError, KeyError, IndexError, TypeError, OverflowError) as e:
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    if reader.byte_order != "I":
        raise GGUFError(f"{path}: the file's byte order differs from this machine's")

    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's pseudo-fields: version and counts
            continue
        try:
            metadata[key] = field.contents()
        except UnicodeDecodeError as e:
            raise GGUFError(f"{path}: metadata key {key!r} holds a string that is not UTF-8") from e

    tensors = {}
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if end > size:
            raise GGUFError(
                f"{path}: file is truncated: tensor {t.name!r} ({t.tensor_type.name}, "
                f"{t.n_bytes} bytes from byte {t.data_offset}) ends at byte {end} but the file "
                f"has {size} bytes"
            )
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        raw = reader.data[t.data_offset : end]
        tensors[t.name] = GGUFTensor(t.name, t.tensor_type.name, shape, raw, path)
    return GGUFFile(path=path, metadata=metadata, tensors=tensors)


# ------------------------------------------------------------------------------------------------
# The Hugging Face view: config.json and state dict names.


@dataclasses.dataclass(frozen=True)
class _Architecture:
    model_type: str
    hf_class: str
    # convert_hf_to_gguf.py permutes q/k rows (weights and biases) of "llama" models so that
    # llama.cpp can rotate adjacent pairs; Qwen 2 is written with the HF layout (NeoX RoPE).
    permuted_qk: bool


_ARCHITECTURES = {
    "llama": _Architecture("llama", "LlamaForCausalLM", permuted_qk=True),
    "qwen2": _Architecture("qwen2", "Qwen2ForCausalLM", permuted_qk=False),
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {  # "blk.{i}.<key>" -> "model.layers.{i}.<value>"
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


def hf_name(gguf_name: str) -> str:
    """The Hugging Face Llama/Qwen 2 name of a GGUF tensor, e.g. "blk.3.attn_q.weight" ->
    "model.layers.3.self_attn.q_proj.weight".

    Raises:
      GGUFError: the name is not one of a Llama/Qwen 2 model's tensors.
    """
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{int(match.group(1))}.{_LAYER_NAMES[match.group(2)]}"
    raise GGUFError(f"unknown GGUF tensor name {gguf_name!r}: it has no Hugging Face name")


def permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rows -> llama.cpp rows of a q or k projection (what convert_hf_to_gguf.py writes).

    HF's rotate-half RoPE pairs rows i and i + H/2 of each head; llama.cpp's pairs rows 2i and
    2i + 1. Per head, the rows seen as [2, H/2] are transposed to [H/2, 2].

    Args:
      w: [n_head * H, ...] weight or bias.
      n_head: heads in w (num_key_value_heads for k).
    """
    head_dim = _head_dim_of(w, n_head)
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_from_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute_for_gguf`: llama.cpp rows -> HF rotate-half rows."""
    head_dim = _head_dim_of(w, n_head)
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _head_dim_of(w: np.ndarray, n_head: int) -> int:
    if n_head <= 0 or w.shape[0] % (2 * n_head):
        raise ValueError(f"{w.shape[0]} rows do not split into {n_head} heads of even size")
    return w.shape[0] // n_head


def _architecture(f: GGUFFile) -> _Architecture:
    arch = _ARCHITECTURES.get(f.architecture)
    if arch is None:
        raise GGUFError(
            f"{f.path}: architecture {f.architecture!r} is not supported; supported are "
            f"{', '.join(sorted(_ARCHITECTURES))}"
        )
    return arch


def _short_float(x: float) -> float:
    """Undoes float32 storage noise (9.99999974e-06 -> 1e-05) for values that are float32."""
    x = float(x)
    return float(str(np.float32(x))) if float(np.float32(x)) == x else x


def hf_config_from_gguf(f: GGUFFile) -> dict[str, Any]:
    """A Hugging Face `config.json` dict for a "llama" or "qwen2" GGUF file.

    Raises:
      GGUFError: unsupported architecture, RoPE scaling or partial rotary embeddings, per-layer
        head counts, or a required metadata key is missing.
    """
    arch = _architecture(f)
    md, prefix = f.metadata, f.architecture

    def get(key: str, default: Any = ...) -> Any:
        full = f"{prefix}.{key}"
        if full not in md:
            if default is ...:
                raise GGUFError(f"{f.path}: metadata key {full!r} is missing")
            return default
        value = md[full]
        if isinstance(value, list):  # per-layer values: fine while all layers agree
            if len(set(value)) != 1:
                raise GGUFError(f"{f.path}: per-layer values of {full!r} are not supported")
            value = value[0]
        return value

    scaling = get("rope.scaling.type", "none")
    if scaling != "none":
        raise GGUFError(f"{f.path}: RoPE scaling {scaling!r} is not supported")
    if "rope_freqs.weight" in f.tensors:
        raise GGUFError(f"{f.path}: RoPE frequency factors (rope_freqs.weight) are not supported")

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise GGUFError(f"{f.path}: key_length != value_length is not supported")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise GGUFError(f"{f.path}: partial rotary embeddings (rope.dimension_count) unsupported")

    vocab_size = get("vocab_size", None) or len(md.get("tokenizer.ggml.tokens", []))
    if not vocab_size and "token_embd.weight" in f.tensors:
        vocab_size = f.tensors["token_embd.weight"].shape[0]
    if not vocab_size:
        raise GGUFError(f"{f.path}: no vocab size (no vocab_size key, token list or embedding)")

    config = {
        "model_type": arch.model_type,
        "architectures": [arch.hf_class],
        "vocab_size": int(vocab_size),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "rms_norm_eps": _short_float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _short_float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length")),
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if f"{prefix}.attention.key_length" in md:
        config["head_dim"] = head_dim
    if arch.model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in f.tensors
        config["mlp_bias"] = False
    return config


def _hf_shapes(config: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Expected shape of every HF tensor, and the names that may be absent (biases, lm_head)."""
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    h = config.get("head_dim", d // config["num_attention_heads"])
    q, kv = config["num_attention_heads"] * h, config["num_key_value_heads"] * h
    shapes = {
        "model.embed_tokens.weight": (v, d),
        "model.norm.weight": (d,),
        "lm_head.weight": (v, d),
    }
    optional = {"lm_head.weight"}
    per_layer = {
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
    }
    for i in range(config["num_hidden_layers"]):
        for key, shape in per_layer.items():
            shapes[f"model.layers.{i}.{key}"] = shape
            if key.endswith(".bias"):
                optional.add(f"model.layers.{i}.{key}")
    return shapes, optional


def hf_state_dict_from_gguf(f: GGUFFile, dtype: npt.DTypeLike = np.float32) -> dict:
    """The dequantized tensors under Hugging Face names, q/k in HF's rotate-half row order.

    Args:
      f: a "llama" or "qwen2" file.
      dtype: numpy dtype of the returned arrays.

    Returns:
      {hf_name: array}; "lm_head.weight" is absent when the embeddings are tied.

    Raises:
      GGUFError: as `hf_config_from_gguf`, or a tensor is unknown, missing, of an unsupported
        type, or has the wrong shape.
    """
    config = hf_config_from_gguf(f)
    arch = _architecture(f)
    shapes, optional = _hf_shapes(config)
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    state = {}
    for name, tensor in f.tensors.items():
        try:
            key = hf_name(name)
        except GGUFError as e:
            raise GGUFError(f"{f.path}: {e}") from None
        if key not in shapes:
            raise GGUFError(f"{f.path}: tensor {name!r} is beyond the model's layers ({key})")
        if tensor.shape != shapes[key]:
            raise GGUFError(
                f"{f.path}: tensor {name!r} has shape {tensor.shape}, expected {shapes[key]}"
            )
        values = tensor.dequantize(np.float32)
        proj = key.rsplit(".", 2)[-2]
        if arch.permuted_qk and proj in heads:
            values = unpermute_from_gguf(values, heads[proj])
        state[key] = values.astype(dtype, copy=False)
    missing = sorted(set(shapes) - set(state) - optional)
    if missing:
        raise GGUFError(f"{f.path}: {len(missing)} tensors are missing, e.g. {missing[:3]}")
    return state
