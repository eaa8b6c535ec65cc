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

from train.defaults import shakespeare_char_config, tiny_char_runlocal


def get_config(arg=None):
    config = shakespeare_char_config()  # the baby GPT's size and nanoGPT's schedule
    config.data.objective = "blank_infilling"
    config.data.noise_density = 0.15
    config.data.mean_span_length = 3.0
    m = config.model
    m.norm, m.mlp_activation, m.position = "layernorm", "gelu", "learned"
    m.block_positions = True
    m.tie_embeddings = True
    m.max_seq_len = 72  # 64 characters + [S] and [E] around each of the 3 spans

    if arg == "runlocal":
        tiny_char_runlocal(config)
    elif arg is not None:
        raise ValueError(f"unknown variant {arg!r}: use runlocal")
    return config
