"""LoRA adapters in Hugging Face PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

PEFT names a Llama adapter tensor `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
([r, in]) and `...lora_B.weight` ([out, r]): the base tensor's name (models/hf.py's spec table)
with `.weight` replaced. Only projections that the table maps by a plain transpose-and-reshape
(all of Llama's and Qwen 2's) can hold such adapters; a model with a fused or permuted one
(GPT-2's c_attn, BLOOM's query_key_value) is refused, naming the tensor.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import hf, safetensors_io
from models.lora import (
    LoRAConfig,
    LoRADense,
    apply_lora,
    lora_modules,
    projections,
    unmerge_lora,
    weight_layout,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# adapter_config.json keys whose non-default values change the math; we refuse them by name.
_UNSUPPORTED = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "modules_to_save": None,
    "bias": "none",
    "lora_bias": False,
    "use_qalora": False,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
}


class AdapterError(ValueError):
    """An adapter that does not fit the model, or that we cannot represent."""


def _module_specs(model: nnx.Module) -> dict[str, hf.Spec]:
    """Our projection path ("blocks/attn/q_proj") -> its spec in models/hf.py's table.

    Raises AdapterError for projections whose Hugging Face tensor is not a plain Linear weight.
    """
    cfg = model.cfg
    model_type = hf.architecture_of(cfg)
    by_path = {}
    for spec in hf._SPECS[model_type](cfg):
        for path in spec.paths:
            by_path["/".join(path)] = spec
    out = {}
    for path, _, name in projections(model):
        spec = by_path.get(path)
        if spec is None or not _is_plain_linear(spec, model, name, path):
            hf_name = spec.hf_name if spec else "?"
            raise AdapterError(
                f"{path} ({model_type} tensor {hf_name}) is fused or permuted in the "
                f"{model_type} layout; PEFT adapters are supported for llama and qwen2"
            )
        out[path] = spec
    return out


def _is_plain_linear(spec: hf.Spec, model: nnx.Module, name: str, path: str) -> bool:
    """True when the spec maps a torch Linear [out, in] to ours [*in, *out] by W.T.reshape."""
    if len(spec.paths) != 1 or not spec.hf_name.endswith(".weight"):
        return False
    shape = _per_layer_shape(model, path)
    nc = 2 if name == "o_proj" else 1
    n_in, n_out = math.prod(shape[:nc]), math.prod(shape[nc:])
    probe = np.arange(n_in * n_out, dtype=np.float32).reshape(n_out, n_in)
    ours = spec.to_ours(probe)[0]
    return ours.shape == shape and np.array_equal(ours, probe.T.reshape(shape))


def _per_layer_shape(model: nnx.Module, path: str) -> tuple[int, ...]:
    node = model
    for part in path.split("/"):
        node = getattr(node, part)
    if isinstance(node, LoRADense):
        node = node.base
    return weight_layout(node)[1]


def _peft_name(spec: hf.Spec, layer: int, which: str) -> str:
    module = spec.hf_name.format(i=layer).removesuffix(".weight")
    return f"{PREFIX}{module}.lora_{which}.weight"


def save_adapter(
    model: nnx.Module, config: LoRAConfig, path: str | os.PathLike, base_model: str = ""
) -> pathlib.Path:
    """Writes the model's adapters as a PEFT adapter dir that `peft.PeftModel` loads.

    Each file is written to a temporary name and renamed into place, so a reader never sees a
    half-written file.

    Args:
      model: a Llama / Qwen 2 Decoder with LoRA (`apply_lora`), merged or not.
      config: its LoRAConfig (alpha, dropout, rslora go into adapter_config.json).
      path: the directory to create.
      base_model: base_model_name_or_path for adapter_config.json (e.g. the HF repo id).
    """
    modules = lora_modules(model)
    if not modules:
        raise AdapterError("the model has no LoRA adapters to save (apply_lora first)")
    specs = _module_specs(model)
    tensors = {}
    for mpath, module in modules.items():
        spec = specs[mpath]
        a = np.asarray(module.lora_a[...], np.float32)
        b = np.asarray(module.lora_b[...], np.float32)
        rank = a.shape[-1]
        per_layer = spec.per_layer
        for i in range(a.shape[0] if per_layer else 1):
            ai, bi = (a[i], b[i]) if per_layer else (a, b)
            tensors[_peft_name(spec, i, "A")] = ai.reshape(-1, rank).T  # [r, in]
            tensors[_peft_name(spec, i, "B")] = bi.reshape(rank, -1).T  # [out, r]
    targets = sorted({specs[p].hf_name.removesuffix(".weight").rsplit(".", 1)[-1] for p in modules})
    settings = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
    }
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    safetensors_io.write(out / WEIGHTS_FILE, tensors)
    tmp = out / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(settings, indent=2) + "\n")
    os.replace(tmp, out / CONFIG_FILE)
    return out


def read_adapter_config(path: str | os.PathLike) -> dict:
    file = pathlib.Path(path) / CONFIG_FILE
    try:
        settings = json.loads(file.read_text())
    except FileNotFoundError as e:
        raise AdapterError(f"{file.parent} has no {CONFIG_FILE}") from e
    except json.JSONDecodeError as e:
        raise AdapterError(f"{file} is not valid JSON: {e}") from e
    if settings.get("peft_type") != "LORA":
        raise AdapterError(f"{file}: peft_type={settings.get('peft_type')!r}, only LORA loads")
    for key, default in _UNSUPPORTED.items():
        value = settings.get(key, default)
        if value not in (default, None, {}, [], False):
            raise AdapterError(f"{file}: {key}={value!r} is not supported (only {default!r})")
    for key in ("r", "lora_alpha"):
        if key not in settings:
            raise AdapterError(f"{file} has no {key!r}")
    return settings


def load_adapter(
    model: nnx.Module, path: str | os.PathLike, rngs: nnx.Rngs | None = None
) -> LoRAConfig:
    """Loads a PEFT LoRA adapter dir into the model (ours or trained with peft elsewhere).

    Applies LoRA to the projections the adapter has tensors for when the model has none yet;
    a model that already has adapters must have them on exactly those projections, with the
    same rank. Loaded adapters are unmerged.

    Args:
      model: a Llama / Qwen 2 Decoder (float or quantized base).
      path: the adapter dir (adapter_config.json, adapter_model.safetensors).
      rngs: for `apply_lora` (the values it draws are overwritten); default nnx.Rngs(0).

    Returns:
      The adapter's LoRAConfig (targets are the adapted parameter names).

    Raises:
      AdapterError: naming a missing or unexpected tensor, a tensor of the wrong shape (the
        adapter was trained for another base), or an unsupported adapter setting.
    """
    path = pathlib.Path(path)
    settings = read_adapter_config(path)
    file = path / WEIGHTS_FILE
    if not file.exists():
        raise AdapterError(f"{path} has no {WEIGHTS_FILE} (.bin adapters are not supported)")
    try:
        tensors, _ = safetensors_io.read(file)
    except safetensors_io.SafetensorsError as e:
        raise AdapterError(str(e)) from e
    specs = _module_specs(model)
    layers = model.cfg.num_layers
    # Which projections does the adapter cover? A projection is in when any of its tensors is.
    patterns = {
        mpath: re.compile(
            re.escape(PREFIX + spec.hf_name.removesuffix(".weight")).replace(r"\{i\}", r"(\d+)")
            + r"\.lora_[AB]\.weight"
        )
        for mpath, spec in specs.items()
    }
    covered, unknown = set(), []
    for name in tensors:
        hits = [m for m, p in patterns.items() if p.fullmatch(name)]
        if hits:
            covered.update(hits)
        else:
            unknown.append(name)
    if unknown:
        raise AdapterError(
            f"{file}: {len(unknown)} tensors match no projection of this "
            f"{hf.architecture_of(model.cfg)} model, e.g. {sorted(unknown)[:3]}"
        )
    if not covered:
        raise AdapterError(f"{file} holds no LoRA tensors")
    rank = int(settings["r"])
    config = LoRAConfig(
        rank=rank,
        alpha=float(settings["lora_alpha"]),
        dropout=float(settings.get("lora_dropout") or 0.0),
        targets=tuple(sorted(p.rsplit("/", 1)[-1] for p in covered)),
        rslora=bool(settings.get("use_rslora", False)),
    )
    unmerge_lora(model)
    existing = lora_modules(model)
    if not existing:
        apply_lora(model, config, rngs or nnx.Rngs(0))
    elif set(existing) != covered:
        raise AdapterError(
            f"the model has LoRA on {sorted(existing)}, the adapter on {sorted(covered)}"
        )
    for mpath, module in lora_modules(model).items():
        spec = specs[mpath]
        if module.lora_a[...].shape[-1] != rank:
            raise AdapterError(
                f"{mpath}: the model's LoRA rank differs from the adapter's r={rank}"
            )
        n_in, n_out = math.prod(module.in_shape), math.prod(module.out_shape)
        a_parts, b_parts = [], []
        for i in range(layers if spec.per_layer else 1):
            for which, expected, parts in (
                ("A", (rank, n_in), a_parts),
                ("B", (n_out, rank), b_parts),
            ):
                name = _peft_name(spec, i, which)
                if name not in tensors:
                    raise AdapterError(f"{file}: missing tensor {name!r} (expected {expected})")
                array = tensors[name]
                if tuple(array.shape) != expected:
                    raise AdapterError(
                        f"{file}: tensor {name!r} has shape {tuple(array.shape)}, but this "
                        f"model expects {expected} (r={rank}, in={n_in}, out={n_out}): was it "
                        "trained for another base model?"
                    )
                parts.append(np.asarray(array, np.float32))
        a = np.stack([p.T.reshape(*module.in_shape, rank) for p in a_parts])
        b = np.stack([p.T.reshape(rank, *module.out_shape) for p in b_parts])
        if not spec.per_layer:
            a, b = a[0], b[0]
        module.lora_a[...] = jnp.asarray(a, module.lora_a[...].dtype)
        module.lora_b[...] = jnp.asarray(b, module.lora_b[...].dtype)
        module.scale, module.rate, module.merged = config.scale, config.dropout, False
    return config
