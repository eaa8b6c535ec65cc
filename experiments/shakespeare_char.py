"""The main job: a character-level GPT trained on Shakespeare's complete works.

Launch (or `make run`):
  python -m train --config experiments/shakespeare_char.py --workdir runs/shakespeare_char

Measured on 2 CPU cores (AMD EPYC VM), 2026-11-25: about 7 minutes in all, validation loss 1.78
nats/char on the held-out plays (Hamlet, Macbeth, Julius Caesar, Twelfth Night; see
train/corpus.py). The goal is 1.9 or better.
Variants:
  :baby     nanoGPT's CPU "baby GPT" (4 layers, 4 heads, 128 dims, context 64, batch 12,
            2000 iterations): the speed comparison in the README.
  :runlocal a tiny model and a few steps, for tests and notebooks.
"""

from train.defaults import base_config


def get_config(arg=None):
    config = base_config()
    config.data.source = "shakespeare"  # or any .txt file / directory of texts
    config.data.tokenizer = "char"

    # nanoGPT baby-GPT schedule: lr 1e-3 -> 1e-4 cosine, warmup 100, beta2 0.99, wd 0.1.
    config.optimizer.learning_rate = 1e-3
    config.optimizer.min_learning_rate = 1e-4
    config.optimizer.warmup_steps = 100

    m = config.model
    m.norm, m.mlp_activation, m.position = "layernorm", "gelu", "learned"  # GPT-2 style
    m.tie_embeddings = True
    m.num_layers, m.num_heads, m.embed_dim, m.mlp_dim = 4, 4, 128, 512
    m.max_seq_len = config.data.seq_len = 64
    m.scan_unroll = m.num_layers  # small model on CPU: unrolled layers run ~30% faster
    config.data.batch_size = 12
    config.data.eval_batch_size = 128  # evaluation is forward-only: bigger batches, fewer calls
    config.train.num_steps = 2000
    config.train.eval_every = 500
    config.train.checkpoint_every = 1000

    if arg is None:
        # The main job: the baby GPT fed twice the tokens per step (2000 x 24 x 64 characters).
        config.data.batch_size = 24
    if arg == "runlocal":
        m.num_layers, m.num_heads, m.embed_dim, m.mlp_dim = 2, 2, 32, 64
        m.scan_unroll = 1
        config.train.num_steps = 20
        config.optimizer.warmup_steps = 2
        config.train.log_every = config.train.eval_every = 10
        config.train.checkpoint_every = 10
        config.data.eval_batches = 4
        config.data.eval_batch_size = 0  # = batch_size, so tiny corpora fill a batch
        config.train.sample_tokens = 20
        config.train.progress_bar = False
    elif arg not in (None, "baby"):
        raise ValueError(f"unknown variant {arg!r}: use baby or runlocal")
    return config
