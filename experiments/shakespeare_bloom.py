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

from train.defaults import base_config


def get_config(arg=None):
    config = base_config()
    config.data.source = "shakespeare"
    config.data.tokenizer = "char"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.min_learning_rate = 1e-4
    config.optimizer.warmup_steps = 100

    m = config.model
    m.norm, m.mlp_activation, m.position = "layernorm", "gelu", "alibi"
    m.embed_norm = True
    m.qkv_bias = m.out_bias = True
    m.tie_embeddings = True
    m.num_layers, m.num_heads, m.embed_dim, m.mlp_dim = 4, 4, 128, 512
    m.max_seq_len = config.data.seq_len = 64
    m.scan_unroll = m.num_layers
    config.data.batch_size = 12
    config.data.eval_batch_size = 128
    config.train.num_steps = 2000
    config.train.eval_every = 500
    config.train.checkpoint_every = 1000

    if arg == "runlocal":
        m.num_layers, m.num_heads, m.embed_dim, m.mlp_dim = 2, 2, 32, 64
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
