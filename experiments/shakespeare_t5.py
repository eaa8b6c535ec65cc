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

from train.defaults import base_config


def get_config(arg=None):
    config = base_config()
    config.data.source = "shakespeare"
    config.data.tokenizer = "char"
    config.data.objective = "span_corruption"
    config.data.noise_density = 0.15
    config.data.mean_span_length = 3.0
    config.optimizer.learning_rate = 1e-3
    config.optimizer.min_learning_rate = 1e-4
    config.optimizer.warmup_steps = 100

    m = config.model
    m.architecture = "encoder_decoder"
    m.norm, m.mlp_activation, m.position = "rmsnorm", "geglu", "relative"
    m.norm_eps = 1e-6
    m.scale_attention = False
    m.tie_embeddings = False
    m.relative_buckets, m.relative_max_distance = 32, 128
    m.num_layers, m.num_heads, m.embed_dim, m.mlp_dim = 3, 4, 128, 384
    m.num_decoder_layers = 3
    m.max_seq_len = config.data.seq_len = 64
    m.scan_unroll = 3
    config.data.batch_size = 12
    config.data.eval_batch_size = 128
    config.train.num_steps = 2000
    config.train.eval_every = 500
    config.train.checkpoint_every = 1000

    if arg == "runlocal":
        m.num_layers, m.num_decoder_layers, m.num_heads, m.embed_dim, m.mlp_dim = 2, 2, 2, 32, 64
        m.scan_unroll = 1
        config.train.num_steps = 20
        config.optimizer.warmup_steps = 2
        config.train.log_every = config.train.eval_every = 10
        config.train.checkpoint_every = 10
        config.data.eval_batches = 4
        config.data.eval_batch_size = 0
        config.train.sample_tokens = 20
        config.train.progress_bar = False
    elif arg is not None:
        raise ValueError(f"unknown variant {arg!r}: use runlocal")
    return config
