"""The kernels lower to Triton for CUDA, checked on a CPU machine through `jax.export`.

Lowering runs the Pallas -> Triton IR translation (unsupported primitives, non-power-of-two
loads and stores fail here); Triton's own compilation and the GPU numerics need a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from jax import export

from kernels import _common
from kernels.decode_attention import decode_attention, quantize_kv_int8
from kernels.flash_attention import flash_attention
from kernels.quant_matmul import quant_matmul, quantize_int4, quantize_int8

_TRITON = "__gpu$xla.gpu.triton"


@pytest.fixture(autouse=True)
def _as_if_on_gpu(monkeypatch):
    monkeypatch.setattr(_common, "backend", lambda: "gpu")


def _lower_for_cuda(fn, *args) -> str:
    exported = export.export(
        jax.jit(fn),
        platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(_TRITON)],
    )(*args)
    return exported.mlir_module()


def _spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("h,dtype", [(64, jnp.bfloat16), (128, jnp.float32)])
def test_flash_attention_forward_and_backward_lower_to_triton(dtype, h):
    q, kv = _spec((1, 200, 4, h), dtype), _spec((1, 200, 2, h), dtype)
    seg = _spec((1, 200), jnp.int32)
    attn = functools.partial(flash_attention, interpret=False)

    def loss(q, k, v, seg):
        out = attn(q, k, v, q_segment_ids=seg, kv_segment_ids=seg)
        return jnp.sum(out.astype(jnp.float32))

    module = _lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, seg)
    assert module.count(f"@{_TRITON}") == 3  # forward, dq, dk/dv


@pytest.mark.parametrize("fmt", ["int8", "int8-g32", "int4-g32", "int4-g128"])
def test_quant_matmul_lowers_to_triton(fmt):
    w = jnp.ones((256, 128))
    qw = {
        "int8": lambda: quantize_int8(w),
        "int8-g32": lambda: quantize_int8(w, 32),
        "int4-g32": lambda: quantize_int4(w, 32),
        "int4-g128": lambda: quantize_int4(w, 128),
    }[fmt]()
    fn = functools.partial(quant_matmul, interpret=False)
    assert _TRITON in _lower_for_cuda(fn, _spec((3, 256), jnp.bfloat16), qw)


def test_decode_attention_lowers_to_triton():
    fn = functools.partial(decode_attention, interpret=False)
    pages = _spec((10, 16, 2, 128), jnp.bfloat16)
    args = (_spec((3, 8, 128), jnp.bfloat16), pages, pages)
    module = _lower_for_cuda(fn, *args, _spec((3, 4), jnp.int32), _spec((3,), jnp.int32))
    assert _TRITON in module


def test_int8_kv_decode_attention_lowers_to_triton():
    fn = functools.partial(decode_attention, interpret=False)
    k8, scales = quantize_kv_int8(jnp.ones((10, 16, 2, 128)))
    args = (_spec((3, 8, 128), jnp.bfloat16), k8, k8, _spec((3, 4), jnp.int32))
    module = _lower_for_cuda(
        lambda *a: fn(*a, k_scales=scales, v_scales=scales), *args, _spec((3,), jnp.int32)
    )
    assert _TRITON in module
