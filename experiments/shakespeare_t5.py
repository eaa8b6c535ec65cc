"""A T5-style encoder-decoder trained on Shakespeare with span corruption, character level.

T5 (Raffel et al. 2020) v1.1 layout from the one layer library (models/t5.py): relative
position buckets, RMSNorm, gated-GELU MLPs, unscaled attention, an untied head. The objective
(train/objectives.py) cuts 15% of each 64-character window out in spans of mean length 3 and
teaches the decoder to write them back after their sentinels; the validation loss is over
those target tokens on the held-out plays. At the end the trainer prints a held-out window
with its blanks and the model's greedy fill.

Launch:
  python -m train --config experiments/shakespeare_t5.py --workdir runs/shakespeare_t5

Measured on 2 CPU cores (AMD EPYC VM, loaded by other jobs), 2026-11-25: validation loss 2.374
nats per target token (sentinels included) after 2000 steps, 682 s. At this size and budget the
fills are mostly spaces and common words. Variants: :runlocal (tiny, seconds).
"""

from train.defaults import shakespeare_char_config, tiny_char_runlocal


def get_config(arg=None):
    config = shakespeare_char_config()  # the baby GPT's size and nanoGPT's schedule
    config.data.objective = "span_corruption"
    config.data.noise_density = 0.15
    config.data.mean_span_length = 3.0
    m = config.model
    m.architecture = "encoder_decoder"
    m.norm, m.mlp_activation, m.position = "rmsnorm", "geglu", "relative"
    m.norm_eps = 1e-6
    m.scale_attention = False
    m.tie_embeddings = False
    m.relative_buckets, m.relative_max_distance = 32, 128
    m.num_layers = m.num_decoder_layers = m.scan_unroll = 3
    m.mlp_dim = 384  # gated: three matrices, about the parameters of a 512-wide GELU MLP

    if arg == "runlocal":
        tiny_char_runlocal(config)
        m.num_decoder_layers = m.num_layers
    elif arg is not None:
        raise ValueError(f"unknown variant {arg!r}: use runlocal")
    return config
