"""A BLOOM-style character model on Shakespeare: ALiBi instead of a position table.

BLOOM (BigScience 2022) differs from GPT-2 in two places, both switches of the one layer
library: attention scores get a per-head linear distance penalty (ALiBi, Press et al. 2022;
`model.position = "alibi"`) and the embeddings are layer-normalised (`model.embed_norm`).
Same size and schedule as the main job's baby GPT, so the losses compare directly.

Launch:
  python -m train --config experiments/shakespeare_bloom.py --workdir runs/shakespeare_bloom

Measured on 2 CPU cores (AMD EPYC VM), 2026-11-25: validation loss 1.929 nats/char on the
held-out plays after 2000 steps (the GPT-2-style baby GPT with the same size and schedule:
1.912); 586 s wall, on a machine loaded by other jobs at the time. Variants: :runlocal (tiny,
seconds).
"""

from train.defaults import shakespeare_char_config, tiny_char_runlocal


def get_config(arg=None):
    config = shakespeare_char_config()  # the baby GPT's size and nanoGPT's schedule
    m = config.model
    m.norm, m.mlp_activation, m.position = "layernorm", "gelu", "alibi"
    m.embed_norm = True
    m.qkv_bias = m.out_bias = True
    m.tie_embeddings = True

    if arg == "runlocal":
        tiny_char_runlocal(config)
    elif arg is not None:
        raise ValueError(f"unknown variant {arg!r}: use runlocal")
    return config
