"""AdamW with linear warmup and cosine decay, gradient clipping, and a weight-decay mask."""

from __future__ import annotations

import jax
import ml_collections
import optax


def learning_rate_schedule(opt: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then cosine decay to `min_learning_rate` (nanoGPT's)."""
    decay_steps = opt.get("decay_steps") or num_steps
    if opt.warmup_steps >= decay_steps:
        raise ValueError(
            f"optimizer.warmup_steps={opt.warmup_steps} must be below the decay horizon "
            f"({decay_steps} steps)"
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=opt.learning_rate,
        warmup_steps=opt.warmup_steps,
        decay_steps=decay_steps,
        end_value=opt.min_learning_rate,
    )


def decay_mask(params):
    """Weight decay on matrices only: no decay on norm scales, biases (as in GPT-2 / nanoGPT)."""

    def keep(path, _):
        name = str(path[-1].key)  # params are a pure dict: {"blocks": {"attn": {"q_proj": ...}}}
        return not (name == "scale" or name == "bias" or name.endswith("_bias"))

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(
    opt: ml_collections.ConfigDict, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds the optimizer from `config.optimizer`; returns it and its learning-rate schedule."""
    schedule = learning_rate_schedule(opt, num_steps)
    chain = []
    if opt.grad_clip and opt.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(opt.grad_clip))
    chain.append(
        optax.adamw(
            learning_rate=schedule,
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*chain), schedule
