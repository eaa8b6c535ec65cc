"""SmolLM2-135M shape (Llama architecture: 30 layers, d=576, 9 heads, 3 KV heads, SwiGLU 1536,
RoPE base 100000, tied embeddings), trained from scratch on Shakespeare: a GPU/TPU config.

Launch on one GPU (bf16 compute, fp32 parameters):
  python -m train --config experiments/smollm2_135m.py --workdir runs/smollm2_135m

The vocabulary keeps SmolLM2's 49152 rows; the text is tokenized with a SentencePiece BPE of
8192 pieces trained on the corpus (the real SmolLM2 tokenizer and weights come with the
pretrained loaders). Fine-tuning the released weights is a separate experiment.
Variants:
  :runlocal a 2-layer model with the same structure, for tests on CPU.
"""

from models.config import preset
from train.defaults import base_config, make_runlocal, model_config_dict


def get_config(arg=None):
    config = base_config()
    config.model = model_config_dict(
        preset("smollm2-135m", dtype="bfloat16", remat_policy="dots", max_seq_len=2048)
    )
    config.data.tokenizer = "sentencepiece_bpe"
    config.data.vocab_size = 8192
    config.data.seq_len = 2048
    config.data.batch_size = 16
    config.optimizer.learning_rate = 3e-3  # SmolLM2 used 3e-3 with a WSD schedule
    config.optimizer.min_learning_rate = 3e-4
    config.optimizer.warmup_steps = 200
    config.optimizer.b2 = 0.95
    config.train.num_steps = 3000
    config.train.eval_every = 500
    config.train.checkpoint_every = 1000

    if arg == "runlocal":
        m = config.model
        m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads, m.mlp_dim = 2, 48, 3, 1, 96
        m.head_dim = 16
        m.dtype, m.remat_policy, m.vocab_size, m.max_seq_len = "float32", "none", 0, 32
        make_runlocal(config)
    elif arg is not None:
        raise ValueError(f"unknown variant {arg!r}: use runlocal")
    return config
