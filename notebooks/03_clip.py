# %% [markdown]
# # CLIP on handwritten digits
#
# A contrastive image-text model (Radford et al. 2021) trained from scratch on real images:
# scikit-learn's `load_digits`, 1,797 scans of handwritten digits that ship inside the package.
# Each image is paired with a caption from a template ("a handwritten 7", "the digit seven");
# a small ViT and a small causal text transformer learn one embedding space in which an image
# and its caption are close. The full experiment is
#
# ```
# python -m train --config experiments/clip_digits.py --workdir runs/clip_digits
# ```
#
# (`:siglip` swaps InfoNCE for the sigmoid loss; docs/clip.md has the results). Here we train a
# smaller run of the same config, then look at the image-text similarity matrix and at
# zero-shot predictions on held-out digits.

# %%
import importlib.util
import pathlib
import shutil
import sys
import tempfile

# Not pip-installed and run from notebooks/? Import the packages from the checkout above.
if importlib.util.find_spec("models") is None:
    sys.path.insert(0, str(pathlib.Path.cwd().resolve().parent))

import matplotlib.pyplot as plt
import numpy as np

from train import contrastive_data as cd
from train.config_lib import apply_overrides, load_config_script
from train.contrastive import load_trained
from train.trainer import train_and_evaluate

# %% [markdown]
# ## Train
#
# The full config's towers (2 layers, width 64 each) for 300 steps instead of 1,500: about a
# minute on a laptop CPU. `train_and_evaluate` writes metrics, checkpoints and `results.json`
# (zero-shot, linear-probe and retrieval numbers on the held-out 20%) into the work directory.

# %%
cwd = pathlib.Path.cwd().resolve()
repo_root = next(p for p in [cwd, *cwd.parents] if (p / "experiments").is_dir())
config = load_config_script(f"{repo_root}/experiments/clip_digits.py")
apply_overrides(
    config,
    [
        "train.num_steps=300",
        "optimizer.warmup_steps=30",
        "train.eval_every=100",
        "train.checkpoint_every=300",
        "train.progress_bar=False",
        "train.tensorboard=False",
    ],
)
workdir = pathlib.Path(tempfile.mkdtemp(prefix="jaxlm-clip-"))
result = train_and_evaluate(config, workdir)

# %% [markdown]
# ## The image-text similarity matrix
#
# Twenty held-out digits (two of each class) against their captions: cosine similarities of the
# unit-norm embeddings. A trained model puts its largest values on the diagonal and in the
# same-digit blocks beside it, since two captions of one digit mean the same thing.

# %%
model, tokenizer = load_trained(workdir)
data = cd.load_digits_split(
    config.model.image_size,
    config.data.test_fraction,
    config.data.seed,
    config.model.text.max_seq_len,
)
pick = np.concatenate([np.flatnonzero(data.test_labels == d)[:2] for d in range(10)])
captions = [data.test_captions()[i] for i in pick]
image_embeds = np.asarray(model.encode_image(data.test_images[pick]))
text_embeds = np.asarray(model.encode_text(tokenizer.encode(captions)))
similarity = image_embeds @ text_embeds.T

fig, ax = plt.subplots(figsize=(9, 8))
im = ax.imshow(similarity, cmap="viridis")
ax.set_xticks(range(len(captions)), captions, rotation=90, fontsize=7)
ax.set_yticks(range(len(pick)), [f"image of a {d}" for d in data.test_labels[pick]], fontsize=7)
fig.colorbar(im, ax=ax, label="cosine similarity")
ax.set_title("held-out images x captions")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Zero-shot predictions
#
# Each class is described by a prompt ensemble: the mean embedding of five phrasings
# ("the number seven", "a photo of the digit 7", ...). An image's prediction is the class whose
# description is nearest; no classifier was trained.

# %%
classes = cd.class_text_embeddings(model.encode_text, tokenizer, cd.ZERO_SHOT_TEMPLATES)
all_embeds = np.asarray(model.encode_image(data.test_images))
predictions = np.argmax(all_embeds @ classes.T, axis=-1)
accuracy = np.mean(predictions == data.test_labels)
print(f"zero-shot top-1 on {len(predictions)} held-out digits: {accuracy:.3f}")

fig, axes = plt.subplots(4, 8, figsize=(10, 5.5))
for ax, i in zip(axes.ravel(), range(32), strict=True):
    ax.imshow(data.test_images[i, :, :, 0], cmap="gray_r")
    ok = predictions[i] == data.test_labels[i]
    ax.set_title(f"pred {predictions[i]}", color="green" if ok else "red", fontsize=9)
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# The run directory is temporary; skip this cell to keep it.

# %%
shutil.rmtree(workdir)
