"""The main job: a character-level GPT trained on Shakespeare's complete works.

Launch (or `make run`):
  python -m train --config experiments/shakespeare_char.py --workdir runs/shakespeare_char

Measured on 2 CPU cores (AMD EPYC VM), 2026-12-07: about 3 minutes in all, validation loss 1.78
nats/char on the held-out plays (Hamlet, Macbeth, Julius Caesar, Twelfth Night; see
train/corpus.py). The goal is 1.9 or better.
Variants:
  :baby     nanoGPT's CPU "baby GPT" (4 layers, 4 heads, 128 dims, context 64, batch 12,
            2000 iterations): the speed comparison in the README.
  :runlocal a tiny model and a few steps, for tests and notebooks.
"""

from train.defaults import shakespeare_char_config, tiny_char_runlocal


def get_config(arg=None):
    config = shakespeare_char_config()  # the baby GPT's size and nanoGPT's schedule
    m = config.model
    m.norm, m.mlp_activation, m.position = "layernorm", "gelu", "learned"  # GPT-2 style
    m.tie_embeddings = True

    # One single-threaded XLA device per core, the batch split between them (parallel/cpu.py):
    # on 2 cores the step takes 23 instead of 38 ms. Ignored on GPU/TPU.
    config.parallel.cpu_devices = -1
    if arg is None:
        # The main job: the baby GPT fed twice the tokens per step (2000 x 24 x 64 characters).
        config.data.batch_size = 24
        # Two micro-batches of 12 rows: 6 rows per device keep a step's activations in a core's
        # cache (74 -> 62 ms a step on 2 cores); the gradient is the same token mean.
        config.train.grad_accum_steps = 2
    if arg == "runlocal":
        tiny_char_runlocal(config)
        config.parallel.cpu_devices = 0  # tests and notebooks run in a process JAX has started
    elif arg not in (None, "baby"):
        raise ValueError(f"unknown variant {arg!r}: use baby or runlocal")
    return config
