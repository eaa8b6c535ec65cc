"""A GLM-style model trained on Shakespeare with autoregressive blank infilling, character level.

GLM (Du et al. 2022) is one decoder with three changes, all switches of the layer library and
the objective (train/objectives.py BlankInfilling): spans of each window are replaced by
[MASK] and generated after it, one span at a time, after [S] and up to [E]; the corrupted
context attends to itself both ways (a prefix-LM mask, `prefix_len`); and a second learned
position table holds the position inside a span (`model.block_positions`, the 2D positions).
The validation loss is over the generated spans' tokens (and each [E]) on the held-out plays;
at the end the trainer shows a held-out window with a blank and the model's greedy fill.

Launch:
  python -m train --config experiments/shakespeare_glm.py --workdir runs/shakespeare_glm

Measured on 2 CPU cores (AMD EPYC VM, loaded by other jobs), 2026-11-25: validation loss 2.281
nats per span token ([E] included) after 2000 steps, 568 s. Variants: :runlocal (tiny, seconds).
"""

from train.defaults import base_config


def get_config(arg=None):
    config = base_config()
    config.data.source = "shakespeare"
    config.data.tokenizer = "char"
    config.data.objective = "blank_infilling"
    config.data.noise_density = 0.15
    config.data.mean_span_length = 3.0
    config.optimizer.learning_rate = 1e-3
    config.optimizer.min_learning_rate = 1e-4
    config.optimizer.warmup_steps = 100

    m = config.model
    m.norm, m.mlp_activation, m.position = "layernorm", "gelu", "learned"
    m.block_positions = True
    m.tie_embeddings = True
    m.num_layers, m.num_heads, m.embed_dim, m.mlp_dim = 4, 4, 128, 512
    config.data.seq_len = 64
    m.max_seq_len = 72  # 64 characters + [S] and [E] around each of the 3 spans
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
