"""Fine-tuning a pretrained model in the trainer: load, optionally quantize and LoRA-wrap, and
split the parameters into the trainable and the frozen.

With `config.init_from` set, the architecture and tokenizer come from the checkpoint and
`config.model` only supplies numerics (RUNTIME_FIELDS). With `config.lora.rank > 0` only the
adapter parameters train; the base stays frozen (int8/int4 weight-only quantized when
`config.model.quant` says so: QLoRA) and is not saved in checkpoints: a resumed run reloads it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from models import build_model
from models.config import ModelConfig

# Fields of config.model that apply to a pretrained model: how it computes, not what it is.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat_policy", "scan_unroll", "attention_impl")


def lora_config(config: ml_collections.ConfigDict):
    """The `models.lora.LoRAConfig` of `config.lora`, or None when rank is 0 (full training)."""
    if not config.lora.rank:
        return None
    from models.lora import LoRAConfig

    return LoRAConfig(
        rank=config.lora.rank,
        alpha=config.lora.alpha,
        dropout=config.lora.dropout,
        targets=tuple(config.lora.targets),
        rslora=config.lora.rslora,
    )


def load_base(config: ml_collections.ConfigDict) -> tuple[nnx.Module, ModelConfig, Any]:
    """The pretrained model of `config.init_from` with config.model's numerics, its config and
    its tokenizer."""
    from models import load_pretrained

    m = config.model
    lm = load_pretrained(config.init_from, dtype=m.dtype, param_dtype=m.param_dtype)
    if getattr(lm, "tokenizer", None) is None or lm.config.architecture != "decoder":
        raise ValueError(f"init_from={config.init_from!r} is not a decoder language model")
    overrides = {name: m[name] for name in RUNTIME_FIELDS}
    cfg = dataclasses.replace(lm.config, **overrides)
    if config.data.seq_len > cfg.max_seq_len:
        raise ValueError(f"data.seq_len={config.data.seq_len} exceeds {cfg.max_seq_len}")
    # Rebuild with the new numerics (the modules keep their config) and take the weights over.
    model = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
    nnx.update(model, nnx.state(lm.model, nnx.Param))
    return model, cfg, lm.tokenizer


def prepare(
    model: nnx.Module, config: ml_collections.ConfigDict, seed: int
) -> tuple[nnx.GraphDef, dict, dict]:
    """Quantizes (config.model.quant) and LoRA-wraps (config.lora) the model, then splits it.

    Returns:
      (graphdef, trainable params, frozen state) as pure dicts; the frozen state is empty when
      every parameter trains.
    """
    quant = config.model.get("quant", "none")
    lora = lora_config(config)
    if quant != "none":
        if lora is None:
            raise ValueError(
                f"model.quant={quant!r} freezes the base weights: training them needs LoRA "
                "(set lora.rank > 0) or model.quant='none'"
            )
        from models.quantize import quantize

        quantize(model, quant, group_size=config.model.quant_group_size)
    if lora is not None:
        from models.lora import LoRAParam, apply_lora

        apply_lora(model, lora, nnx.Rngs(params=seed))
        graphdef, trainable, frozen = nnx.split(model, LoRAParam, ...)
    else:
        graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)


def count_params(tree) -> int:
    import jax

    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def answer_accuracy(
    model: nnx.Module,
    tokenizer,
    conversations: list[list[dict[str, str]]],
    max_tokens: int,
) -> tuple[float, list[tuple[str, str, str]]]:
    """Greedy replies to held-out conversations, scored against their last assistant turn.

    Returns:
      (exact-match rate, [(question, gold, reply)]) with train.sft_britannica.exact_match.
    """
    from infer.decoding import stream_token_ids
    from train.sft_britannica import exact_match

    rows, hits = [], 0
    for messages in conversations:
        prompt, gold = messages[:-1], messages[-1]["content"]
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        reply_ids = list(
            stream_token_ids(model, ids, max_tokens, temperature=0.0, stop_ids=tokenizer.stop_ids)
        )
        reply = tokenizer.decode(reply_ids).strip()
        hits += exact_match(reply, gold)
        question = prompt[-1]["content"].rsplit("Question:", 1)[-1].strip()
        rows.append((question, gold, reply))
    return hits / max(len(conversations), 1), rows


def save_adapter(model: nnx.Module, config: ml_collections.ConfigDict, path) -> None:
    """Writes the LoRA adapter in the PEFT layout (adapter_config.json + safetensors)."""
    from models.lora import save_adapter as save

    save(model, lora_config(config), path, base_model=config.init_from)
