"""GPT-2 small (124M) shape, trained from scratch on Shakespeare: a GPU/TPU config.

Launch on one GPU (bf16 compute, fp32 parameters):
  python -m train --config experiments/gpt2_124m.py --workdir runs/gpt2_124m

The model is exactly GPT-2 124M (12 layers, 768 dims, 12 heads, 1024 context, vocab 50257,
tied head). GPT-2's own byte-level BPE arrives with the pretrained loaders; here the text is
tokenized with a SentencePiece BPE of 8192 pieces trained on the corpus, and the embedding keeps
GPT-2's 50257 rows (the unused rows are never looked up). Shakespeare is ~1.5M such tokens, so
this run is an overfitting/throughput exercise, not a good language model.
Variants:
  :runlocal a 2-layer model with the same structure, for tests on CPU.
"""

from models.config import preset
from train.defaults import base_config, make_runlocal, model_config_dict


def get_config(arg=None):
    config = base_config()
    config.model = model_config_dict(preset("gpt2-124m", dtype="bfloat16", remat_policy="dots"))
    config.data.tokenizer = "sentencepiece_bpe"
    config.data.vocab_size = 8192
    config.data.seq_len = 1024
    config.data.batch_size = 32
    config.optimizer.learning_rate = 6e-4  # GPT-3 paper, table 2.1, for the 125M model
    config.optimizer.min_learning_rate = 6e-5
    config.optimizer.warmup_steps = 200
    config.optimizer.b2 = 0.95
    config.train.num_steps = 5000
    config.train.eval_every = 500
    config.train.checkpoint_every = 1000
    config.model.dropout_rate = 0.1  # a small corpus for a 124M model

    if arg == "runlocal":
        m = config.model
        m.num_layers, m.embed_dim, m.num_heads, m.mlp_dim = 2, 64, 4, 256
        m.num_kv_heads, m.head_dim = 4, 16
        m.dtype, m.remat_policy, m.vocab_size = "float32", "none", 0
        make_runlocal(config)
    elif arg is not None:
        raise ValueError(f"unknown variant {arg!r}: use runlocal")
    return config
