"""LoRA (Hu et al. 2021): low-rank adapters on the linear projections of any model here.

    model = apply_lora(model, LoRAConfig(rank=8, targets=("q_proj", "v_proj")), nnx.Rngs(0))
    graphdef, adapters, frozen = nnx.split(model, LoRAParam, ...)   # train `adapters` only
    merge_lora(model); unmerge_lora(model)
    save_adapter(model, config, "out/adapter")   # PEFT layout (models/peft.py)

A wrapped projection computes base(x) + dropout(x) @ A @ B * scale on the activations, so the
frozen base (a plain weight or a quantized one: QLoRA) gets no weight-gradient matmul. A is
[*in, r], B is [r, *out] (the contraction split of the base weight, e.g. q_proj [D, N, H] gives
A [D, r], B [r, N, H]); with stacked layers both carry the leading [L] axis too.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers import MLP, Attention, dense, dropout, project

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which projections get adapters, and their shape.

    Attributes:
      rank: r, the inner dim of A [*in, r] and B [r, *out].
      alpha: the update is scaled by alpha / r (alpha / sqrt(r) with rslora).
      dropout: dropout on the adapter's input in training (LoRA paper, section 4).
      targets: parameter names ("q_proj") or regexes matched (re.fullmatch) against the
        parameter path joined by "/" ("blocks/attn/q_proj", so r"blocks/attn/[qv]_proj").
      rslora: rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023), which keeps the
        update's scale steady as r grows.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = PROJECTIONS
    rslora: bool = False

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("LoRA targets is empty; name at least one projection")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class LoRAParam(nnx.Param):
    """An adapter parameter: `nnx.split(model, LoRAParam, ...)` selects exactly the trainable ones."""


class LoRADense(nnx.Module):
    """A projection weight (plain `nnx.Param` or quantized module) plus a low-rank update.

    Called by `models.layers.dense` in place of the weight it wraps.
    """

    def __init__(
        self,
        base,
        lora_a: LoRAParam,
        lora_b: LoRAParam,
        scale: float,
        rate: float,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
    ):
        self.base = base  # [(L,) *in, *out]; frozen (never selected by the LoRAParam filter)
        self.lora_a = lora_a  # [(L,) *in, r]
        self.lora_b = lora_b  # [(L,) r, *out]
        self.scale = scale
        self.rate = rate
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.merged = False

    def __call__(self, x: jax.Array, num_contract: int, dtype, key: jax.Array | None):
        y = dense(x, self.base, num_contract, dtype)
        if self.merged:
            return y
        h = dropout(x, self.rate, key)
        low = project(h, self.lora_a[...].astype(dtype), num_contract)  # [..., r]
        return y + project(low, self.lora_b[...].astype(dtype)) * jnp.asarray(self.scale, dtype)

    def delta(self) -> jax.Array:
        """scale * A @ B in the base weight's shape (with its [L] axis), float32."""
        a, b = self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32)
        rank = a.shape[-1]
        lead = a.shape[: a.ndim - 1 - len(self.in_shape)]  # (L,) or ()
        a2, b2 = a.reshape(*lead, -1, rank), b.reshape(*lead, rank, -1)
        d = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST) * self.scale
        return d.reshape(*lead, *self.in_shape, *self.out_shape)


def num_contract_of(name: str) -> int:
    """Contracted dims of a projection: o_proj [N, H, D] takes [N, H]; the others one dim."""
    return 2 if name == "o_proj" else 1


def weight_layout(weight) -> tuple[int | None, tuple[int, ...], tuple]:
    """(layers L or None, per-layer shape, per-layer logical axes) of a plain or quantized
    weight; L is set for the stacked weights of scanned blocks (a leading "layers" axis)."""
    if not isinstance(weight, nnx.Variable):  # models.quantize.QuantizedDense
        return weight.num_layers, weight.shape, weight.logical_axes
    shape = tuple(weight[...].shape)
    axes = tuple(weight.get_metadata().get("logical_axes") or (None,) * len(shape))
    if axes and axes[0] == "layers":
        return shape[0], shape[1:], axes[1:]
    return None, shape, axes


def projections(model: nnx.Module):
    """(path, owner module, attribute name) of every projection weight (wrapped or not)."""
    found = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, (Attention, MLP)):
            for name in PROJECTIONS:
                if hasattr(node, name):
                    found.append(("/".join(map(str, (*path, name))), node, name))
    return found


def matches(targets: tuple[str, ...], path: str) -> bool:
    leaf = path.rsplit("/", 1)[-1]
    return any(t == leaf or re.fullmatch(t, path) for t in targets)


def lora_modules(model: nnx.Module) -> dict[str, LoRADense]:
    """path -> LoRADense of every adapted projection."""
    return {
        path: getattr(owner, name)
        for path, owner, name in projections(model)
        if isinstance(getattr(owner, name), LoRADense)
    }


def apply_lora(model: nnx.Module, config: LoRAConfig, rngs: nnx.Rngs) -> nnx.Module:
    """Wraps every projection matching `config.targets` in a LoRADense, in place.

    A is drawn uniform(+-1/sqrt(fan_in)) (PEFT's default, kaiming-uniform with a = sqrt(5)),
    B is zero: the wrapped model starts out computing exactly what the base computes.

    Args:
      model: a Decoder / Encoder / T5, with plain or quantized (models.quantize) weights;
        stacked layers (a leading [L] axis) get stacked adapters.
      config: rank, alpha, dropout, targets.
      rngs: draws A.

    Returns:
      The same model object.

    Raises:
      ValueError: no projection matches, or the model already has adapters.
    """
    found = projections(model)
    if any(isinstance(getattr(o, n), LoRADense) for _, o, n in found):
        raise ValueError("the model already has LoRA adapters; unload them before applying more")
    chosen = [(p, o, n) for p, o, n in found if matches(config.targets, p)]
    if not chosen:
        raise ValueError(
            f"LoRA targets {config.targets} match no projection; the model has "
            f"{sorted({p for p, _, _ in found})}"
        )
    for _, owner, name in chosen:
        base = getattr(owner, name)
        layers, shape, axes = weight_layout(base)
        nc = num_contract_of(name)
        in_shape, out_shape = shape[:nc], shape[nc:]
        fan_in = math.prod(in_shape)
        lead, lead_axes = ((layers,), ("layers",)) if layers is not None else ((), ())
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(
            rngs.params(), (*lead, *in_shape, config.rank), jnp.float32, -bound, bound
        )
        b = jnp.zeros((*lead, config.rank, *out_shape), jnp.float32)
        module = LoRADense(
            base,
            LoRAParam(a, logical_axes=(*lead_axes, *axes[:nc], None)),
            LoRAParam(b, logical_axes=(*lead_axes, None, *axes[nc:])),
            config.scale,
            config.dropout,
            in_shape,
            out_shape,
        )
        setattr(owner, name, module)
    return model


def merge_lora(model: nnx.Module) -> None:
    """Adds scale * A @ B into every (float) base weight; the adapters then stop running."""
    for path, module in lora_modules(model).items():
        if module.merged:
            continue
        if not isinstance(module.base, nnx.Variable):
            raise ValueError(
                f"{path}: cannot merge LoRA into a quantized base weight (it would need "
                "requantizing); merge before `quantize`, or keep the adapter separate"
            )
        w = module.base[...]
        module.base[...] = (w.astype(jnp.float32) + module.delta()).astype(w.dtype)
        module.merged = True


def unmerge_lora(model: nnx.Module) -> None:
    """Undoes `merge_lora`: subtracts scale * A @ B again (exact up to float rounding)."""
    for module in lora_modules(model).values():
        if module.merged:
            w = module.base[...]
            module.base[...] = (w.astype(jnp.float32) - module.delta()).astype(w.dtype)
            module.merged = False


def unload_lora(model: nnx.Module, merge: bool = True) -> nnx.Module:
    """Replaces every LoRADense by its base weight (merged first when `merge`), in place.

    The result is a plain model again, e.g. for `models.hf.save_hf_dir`.
    """
    if merge:
        merge_lora(model)
    for _, owner, name in projections(model):
        module = getattr(owner, name)
        if isinstance(module, LoRADense):
            setattr(owner, name, module.base)
    return model


def num_lora_params(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, LoRAParam)))


def save_adapter(model, config: LoRAConfig, path: str | os.PathLike, base_model: str = ""):
    """Writes the adapters in PEFT's layout; see `models.peft.save_adapter`."""
    from models import peft

    return peft.save_adapter(model, config, path, base_model)


def load_adapter(model, path: str | os.PathLike, rngs: nnx.Rngs | None = None) -> LoRAConfig:
    """Loads a PEFT adapter dir (ours or trained elsewhere); see `models.peft.load_adapter`."""
    from models import peft

    return peft.load_adapter(model, path, rngs)
