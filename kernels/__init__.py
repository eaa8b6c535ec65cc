"""Pallas kernels, each beside its plain-JAX reference: attention, paged decode, quantized matmul.

GPU runs them through Pallas' Triton lowering, TPU through Mosaic (the `*_tpu.py` modules); CPU
in interpret mode (slow: for tests). Each module's docstring gives its layout, algorithm and
backends. `_common.use_backend("tpu")` selects the TPU lowering for ahead-of-time compilation.
"""

from kernels.decode_attention import (
    decode_attention,
    quantize_kv_int8,
    reference_decode_attention,
)
from kernels.flash_attention import flash_attention, reference_attention
from kernels.quant_matmul import (
    QuantizedWeight,
    dequantize,
    from_gguf,
    quant_matmul,
    quantize_int4,
    quantize_int8,
    reference_matmul,
)

__all__ = [
    "QuantizedWeight",
    "decode_attention",
    "dequantize",
    "flash_attention",
    "from_gguf",
    "quant_matmul",
    "quantize_int4",
    "quantize_int8",
    "quantize_kv_int8",
    "reference_attention",
    "reference_decode_attention",
    "reference_matmul",
]
