"""Reading and writing safetensors files with numpy, bfloat16 included.

The format (https://github.com/huggingface/safetensors) is an 8-byte little-endian header
length, a JSON header mapping each tensor name to its dtype, shape and byte range, then the raw
bytes. Reading memory-maps the file, so a checkpoint is never copied before it is converted.
Own code rather than the `safetensors` package's numpy API, which cannot hold bfloat16 and
reports a truncated file less clearly.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read: truncated, corrupt, or of an unknown dtype."""


def read(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Memory-maps every tensor of a .safetensors file.

    Returns:
      (tensors by name, the header's `__metadata__` strings).

    Raises:
      SafetensorsError: naming the file and what is wrong with it.
    """
    path = pathlib.Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"{path}: file is {size} bytes, too short for a header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER, size - 8):
            raise SafetensorsError(
                f"{path}: header length {header_len} does not fit the {size}-byte file "
                "(truncated or not a safetensors file)"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from e
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_size = size - data_start
    buffer = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start) if data_size else None
    tensors = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{path}: bad header entry for tensor {name!r}: {info}") from e
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != nbytes:
            raise SafetensorsError(
                f"{path}: tensor {name!r} of shape {shape} and dtype {info['dtype']} needs "
                f"{nbytes} bytes but its byte range holds {end - begin}"
            )
        if end > data_size:
            raise SafetensorsError(
                f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has only "
                f"{size} bytes (truncated?)"
            )
        if nbytes == 0:
            tensors[name] = np.zeros(shape, dtype)
        else:
            tensors[name] = buffer[begin:end].view(dtype).reshape(shape)
    return tensors, metadata


def write(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes tensors to a .safetensors file atomically (a temp file renamed into place)."""
    path = pathlib.Path(path)
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in _NAMES:
            raise SafetensorsError(f"cannot write tensor {name!r} of dtype {array.dtype}")
        header[name] = {
            "dtype": _NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        arrays.append(array)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in arrays:
            f.write(array.tobytes())
    os.replace(tmp, path)
