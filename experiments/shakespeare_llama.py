"""A Llama-style model (RMSNorm, SwiGLU, RoPE, GQA) on Shakespeare with a SentencePiece BPE.

Launch (2 CPU cores, about 10 minutes):
  python -m train --config experiments/shakespeare_llama.py --workdir runs/shakespeare_llama

The tokenizer (BPE, 2048 pieces) is trained on the training plays at the start of the run and
saved in the workdir. Losses are per BPE token, so they are not comparable with the char model's
nats/char; divide by the characters per token the run prints to compare.
Variants:
  :runlocal a tiny model and a few steps, for tests and notebooks.
"""

from train.defaults import base_config, make_runlocal


def get_config(arg=None):
    config = base_config()
    config.data.tokenizer = "sentencepiece_bpe"
    config.data.vocab_size = 2048
    config.data.seq_len = 128
    config.data.batch_size = 16

    m = config.model
    m.norm, m.mlp_activation, m.position = "rmsnorm", "swiglu", "rope"
    m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads = 4, 192, 6, 2  # GQA 3:1
    m.mlp_dim = 512  # SwiGLU's three matrices ~ a GELU MLP of 4 * embed_dim
    m.max_seq_len = config.data.seq_len
    m.rope_theta = 10000.0
    m.tie_embeddings = True
    m.scan_unroll = m.num_layers  # small model on CPU

    config.optimizer.learning_rate = 2e-3
    config.optimizer.min_learning_rate = 2e-4
    config.optimizer.warmup_steps = 100
    config.train.num_steps = 1500
    config.train.eval_every = 500
    config.train.checkpoint_every = 500

    if arg == "runlocal":
        make_runlocal(config)
        m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads, m.mlp_dim = 2, 32, 4, 2, 64
        m.scan_unroll = 1
        m.max_seq_len = config.data.seq_len
    elif arg is not None:
        raise ValueError(f"unknown variant {arg!r}: use runlocal")
    return config
