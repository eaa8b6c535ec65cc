# %% [markdown]
# # Model families side by side: GPT, BLOOM, GLM and T5 on Shakespeare
#
# Every family here is built from the one layer library in `models/`, switched by fields of
# `ModelConfig`, and trained by the same trainer:
#
# - **GPT-2 style** (`experiments/shakespeare_char.py`): learned positions, next-character loss.
# - **BLOOM** (`shakespeare_bloom.py`): ALiBi distance penalties instead of a position table,
#   and a LayerNorm on the embeddings.
# - **GLM** (`shakespeare_glm.py`): blank infilling. Spans of each window become `[MASK]`;
#   the model reads the corrupted text both ways (a prefix-LM mask) and writes each span after
#   `[S]`, with 2D positions (where the blank is, and where inside the span).
# - **T5** (`shakespeare_t5.py`): an encoder-decoder trained with span corruption: the encoder
#   reads the text with sentinels, the decoder writes the missing spans.
#
# Each trains for a couple of hundred steps at a tiny size, so this runs in a few minutes on a
# laptop CPU. The losses are over different tokens (every next character for GPT and BLOOM,
# only the blanked characters for GLM and T5), so compare shapes and samples, not numbers.

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

from train.config_lib import apply_overrides, load_config_script
from train.trainer import train_and_evaluate

cwd = pathlib.Path.cwd().resolve()
repo_root = next(p for p in [cwd, *cwd.parents] if (p / "experiments").is_dir())

# %% [markdown]
# ## One tiny budget for all
#
# Each experiment's `:runlocal` variant, enlarged to 2 layers of 64 dims and trained for 200
# steps of 16 windows of 64 characters.

# %%
FAMILIES = {
    "GPT-2 style": "shakespeare_char.py",
    "BLOOM (ALiBi)": "shakespeare_bloom.py",
    "GLM (blank infilling)": "shakespeare_glm.py",
    "T5 (span corruption)": "shakespeare_t5.py",
}
COMMON = [
    "model.num_layers=2",
    "model.num_heads=4",
    "model.embed_dim=64",
    "model.mlp_dim=192",
    "data.batch_size=16",
    "data.eval_batches=4",
    "optimizer.learning_rate=3e-3",
    "optimizer.min_learning_rate=3e-4",
    "optimizer.warmup_steps=20",
    "train.num_steps=200",
    "train.log_every=20",
    "train.eval_every=50",
    "train.checkpoint_every=200",
    "train.sample_tokens=120",
]

results, workdirs = {}, {}
for name, script in FAMILIES.items():
    config = load_config_script(f"{repo_root}/experiments/{script}:runlocal")
    overrides = list(COMMON)
    if config.model.architecture == "encoder_decoder":
        overrides.append("model.num_decoder_layers=2")
    apply_overrides(config, overrides)
    workdirs[name] = pathlib.Path(tempfile.mkdtemp(prefix="jaxlm-families-"))
    results[name] = train_and_evaluate(config, workdirs[name])
    print(f"{name}: val loss {results[name].val_loss:.3f} after {results[name].elapsed_s:.0f} s")

# %% [markdown]
# ## Validation loss
#
# Every curve falls; GLM's and T5's are over the blanked characters only.

# %%
fig, ax = plt.subplots(figsize=(7, 4))
for name, result in results.items():
    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    points = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    ax.plot(*zip(*points, strict=True), "o-", label=name)
ax.set_xlabel("step")
ax.set_ylabel("validation cross entropy (nats/token)")
ax.legend()
plt.show()

# %% [markdown]
# ## Samples
#
# The trainer ends every run with a sample: GPT and BLOOM continue text; GLM and T5 fill the
# blanks of a held-out window (from a play never seen in training) greedily.

# %%
for name, result in results.items():
    print(f"===== {name}\n{result.samples[-1]}\n")

# %%
for workdir in workdirs.values():
    shutil.rmtree(workdir)
