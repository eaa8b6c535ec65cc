"""Weight-only int8 / int4 quantization of a model's linear projections, for inference.

    quantize(model, "int4", group_size=128)   # in place; q/k/v/o/gate/up/down become QuantizedDense

A `QuantizedDense` holds `kernels.quant_matmul.QuantizedWeight` arrays (integer values, float32
scales, int4 offsets) as `QuantData` variables, which are not `nnx.Param`, so an optimizer over
`nnx.Param` (or `LoRAParam`: QLoRA) never sees them. Embeddings, norms and the LM head stay in
float. The matmul is the plain-JAX `x @ dequantize(w)` by default; with
`attention_impl="pallas"` (config) the Pallas kernel `kernels.quant_matmul.quant_matmul` runs it
instead (Triton on GPU, Mosaic on TPU, interpret mode on CPU).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx

from kernels.quant_matmul import (
    INT4_GROUP_SIZES,
    QuantizedWeight,
    dequantize,
    from_gguf,
    quant_matmul,
    quantize_int4,
    quantize_int8,
)
from models.layers import attention_impl, project

MODES = ("int8", "int4")


class QuantData(nnx.Variable):
    """The frozen arrays of a quantized weight (values, scales, offsets); never trained."""


class QuantizedDense(nnx.Module):
    """A projection weight [*in, *out] stored as int8 or packed int4 (`QuantizedWeight` [K, N]).

    Called by `models.layers.dense` in place of the float weight it replaced.

    Attributes:
      values, scales, offsets: QuantData with the QuantizedWeight arrays ([L] first when
        stacked); offsets is None for int8.
      bits, group_size: the format (group_size = K is per output channel).
      shape: the float weight's per-layer shape, e.g. (D, N, H) for q_proj.
      num_contract: how many leading dims of `shape` are the input (K = their product).
      logical_axes: the float weight's per-layer logical axes (for LoRA adapters built on it).
      num_layers: L for the stacked weights of scanned blocks, else None.
      impl: "xla" (dequantize, then one matmul) or "pallas" (the kernel).
    """

    def __init__(
        self,
        w: QuantizedWeight,
        shape: tuple[int, ...],
        num_contract: int,
        logical_axes: tuple,
        num_layers: int | None,
        impl: str,
    ):
        lead = ("layers",) if num_layers is not None else ()
        self.values = QuantData(w.values, logical_axes=(*lead, None, None))
        self.scales = QuantData(w.scales, logical_axes=(*lead, None, None))
        offsets = w.offsets  # int4 only
        self.offsets = (
            None if offsets is None else QuantData(offsets, logical_axes=self.scales.logical_axes)
        )
        self.bits, self.group_size = w.bits, w.group_size
        self.shape, self.num_contract = tuple(shape), num_contract
        self.logical_axes, self.num_layers, self.impl = tuple(logical_axes), num_layers, impl

    def weight(self) -> QuantizedWeight:
        offsets = None if self.offsets is None else self.offsets[...]
        return QuantizedWeight(
            self.values[...], self.scales[...], offsets, self.bits, self.group_size
        )

    def dequantize(self) -> jax.Array:
        """float32 weight [(L,) *shape]."""
        w = self.weight()
        if self.num_layers is None:
            return dequantize(w).reshape(self.shape)
        return jax.vmap(dequantize)(w).reshape(self.num_layers, *self.shape)

    def __call__(self, x: jax.Array, num_contract: int, dtype, key=None) -> jax.Array:
        """x [..., *in] -> [..., *out] in dtype (one layer's weight: inside the layer scan)."""
        if num_contract != self.num_contract:
            raise ValueError(
                f"weight quantized for num_contract={self.num_contract}, got {num_contract}"
            )
        k = math.prod(self.shape[:num_contract])
        lead = x.shape[: x.ndim - num_contract]
        x2 = x.reshape(*lead, k).astype(dtype)
        if self.impl == "pallas":
            y = quant_matmul(x2, self.weight())
        else:
            y = project(x2, dequantize(self.weight()).astype(dtype))
        return y.reshape(*lead, *self.shape[num_contract:])

    @property
    def nbytes(self) -> int:
        arrays = [self.values, self.scales] + ([self.offsets] if self.offsets is not None else [])
        return sum(a[...].size * a[...].dtype.itemsize for a in arrays)


def group_size_for(k: int, mode: str, group_size: int | None) -> int:
    """The group size used for a weight with K input features.

    `group_size` None means one scale per output channel (int8 only). A group that does not
    divide K falls back to the largest allowed power of two below it that does (SmolLM2's
    D = 576 takes groups of 64 where 128 was asked), so one model-wide setting always works.
    """
    if group_size is None:
        if mode == "int4":
            raise ValueError(f"int4 needs a group_size in {INT4_GROUP_SIZES}, got None")
        return k
    allowed = INT4_GROUP_SIZES if mode == "int4" else (16, 32, 64, 128, 256, 512, 1024)
    if group_size not in allowed:
        raise ValueError(f"{mode} group_size={group_size} must be one of {allowed}")
    for g in sorted((a for a in allowed if a <= group_size), reverse=True):
        if k % g == 0:
            return g
    raise ValueError(f"K={k} is not a multiple of any {mode} group size <= {group_size}")


def _impl(model: nnx.Module) -> str:
    return "pallas" if attention_impl(model.cfg) == "pallas" else "xla"


def quantize_weight(
    w: jax.Array, mode: str, group_size: int | None, num_contract: int, layers: int | None
) -> QuantizedWeight:
    """A float weight [(L,) *in, *out] as a QuantizedWeight over [K, N] ([L] first if stacked)."""
    shape = w.shape[1:] if layers is not None else w.shape
    k, n = math.prod(shape[:num_contract]), math.prod(shape[num_contract:])
    g = group_size_for(k, mode, group_size)

    def one(w2):
        return quantize_int8(w2, g) if mode == "int8" else quantize_int4(w2, g)

    if layers is None:
        return one(w.reshape(k, n))
    return jax.vmap(one)(w.reshape(layers, k, n))


def quantize(model: nnx.Module, mode: str, group_size: int | None = 128) -> nnx.Module:
    """Replaces every float projection weight (q/k/v/o, gate/up/down) by a QuantizedDense.

    In place; LoRA adapters stay float and keep working on top (QLoRA). The model's `cfg` (in
    every module that holds it) records `quant` and `quant_group_size`.

    Args:
      model: a Decoder / Encoder / T5.
      mode: "int8" (symmetric) or "int4" (asymmetric, GGUF Q4_1-like).
      group_size: input rows per scale (see `group_size_for`); None or 0: per channel (int8).

    Returns:
      The same model.
    """
    from models.lora import LoRADense, num_contract_of, projections, weight_layout

    if mode not in MODES:
        raise ValueError(f"quantize mode={mode!r} is not one of {MODES}")
    group_size = group_size or None  # ModelConfig spells per channel 0
    impl = _impl(model)
    for path, owner, name in projections(model):
        holder, attr = owner, name
        if isinstance(getattr(owner, name), LoRADense):
            holder, attr = getattr(owner, name), "base"
            if holder.merged:
                raise ValueError(f"{path}: unmerge LoRA before quantizing its base weight")
        weight = getattr(holder, attr)
        if not isinstance(weight, nnx.Variable):
            raise ValueError(f"{path} is already quantized ({weight.bits}-bit)")
        layers, shape, axes = weight_layout(weight)
        nc = num_contract_of(name)
        qw = quantize_weight(weight[...], mode, group_size, nc, layers)
        setattr(holder, attr, QuantizedDense(qw, shape, nc, axes, layers, impl))
    _record(model, mode, group_size)
    return model


def _record(model: nnx.Module, mode: str, group_size: int | None) -> None:
    for _, node in nnx.iter_graph(model):
        cfg = getattr(node, "cfg", None)
        if isinstance(node, nnx.Module) and cfg is not None and hasattr(cfg, "quant"):
            node.cfg = cfg.replace(quant=mode, quant_group_size=group_size or 0)


def model_bytes(model: nnx.Module) -> int:
    """Bytes of every array the model holds (parameters, quantized weights, adapters)."""
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))


def load_gguf_blocks(model: nnx.Module, file) -> nnx.Module:
    """Replaces a Llama / Qwen 2 decoder's projections by its GGUF file's Q4_0/Q4_1/Q8_0 blocks.

    The blocks become QuantizedWeights as they are (`kernels.quant_matmul.from_gguf`): no
    dequantize-requantize round trip, so the model computes with exactly the file's weights.
    llama.cpp's q/k row order (its RoPE pairs adjacent dims) is undone by permuting output
    columns, which leaves every 32-block intact. A projection stored in another type (F16,
    K-quants) in any layer stays the float weight it was loaded as.

    Args:
      model: the Decoder loaded from the same file (`load_pretrained(path.gguf)`).
      file: its `models.gguf.GGUFFile`.

    Returns:
      The same model.
    """
    from models import gguf
    from models.lora import num_contract_of, projections, weight_layout

    arch = gguf.hf_config_from_gguf(file)["model_type"]
    ours_to_gguf = {
        v.split(".")[-2]: k for k, v in gguf._LAYER_NAMES.items() if k.endswith(".weight")
    }
    heads = {"q_proj": model.cfg.num_heads, "k_proj": model.cfg.num_kv_heads}
    impl, bits = _impl(model), set()
    for path, owner, name in projections(model):
        weight = getattr(owner, name)
        if not isinstance(weight, nnx.Variable):
            raise ValueError(f"{path} is not a plain float weight; load GGUF blocks first")
        layers, shape, axes = weight_layout(weight)
        tensors = [file.tensors[f"blk.{i}.{ours_to_gguf[name]}"] for i in range(layers)]
        if any(t.ggml_type not in ("Q4_0", "Q4_1", "Q8_0") for t in tensors):
            continue
        if len({t.ggml_type[:2] for t in tensors}) > 1:
            continue  # int4 and int8 layers cannot share one stacked weight
        per_layer = []
        for tensor in tensors:
            qw = from_gguf(tensor)
            if arch == "llama" and name in heads:
                order = gguf.unpermute_from_gguf(np.arange(qw.shape[1]), heads[name])
                qw = jax.tree.map(lambda a, order=order: a[:, order], qw)
            per_layer.append(qw)
        stacked = jax.tree.map(lambda *xs: jax.numpy.stack(xs), *per_layer)
        nc = num_contract_of(name)
        setattr(owner, name, QuantizedDense(stacked, shape, nc, axes, layers, impl))
        bits.add(stacked.bits)
    if bits:
        _record(model, "int4" if 4 in bits else "int8", 32)
    return model
