"""Every experiment config builds, validates, and trains one tiny step in its :runlocal mode.

Configs are found by glob, so a new `experiments/<name>.py` is tested without editing this
file (`experiments/benchmarks/` and files starting with "_" are not configs). The tiny step
runs on a generated text file, so no config here needs the network.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest

from train import trainer
from train.config_lib import apply_overrides, load_config_script

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in (REPO / "experiments").glob("*.py") if not p.name.startswith("_"))

pytestmark = pytest.mark.usefixtures("jax_compile_cache")


def _ids(paths):
    return [p.stem for p in paths]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> pathlib.Path:
    """~40 KB of deterministic pseudo-English: varied enough for a SentencePiece vocabulary of a
    few hundred pieces, long enough that its last 10% (validation) fills the runlocal batches."""
    rng = np.random.default_rng(0)
    syllables = [
        "the",
        "an",
        "ing",
        "to",
        "be",
        "or",
        "not",
        "thou",
        "art",
        "king",
        "lo",
        "ve",
        "qu",
        "ick",
        "str",
        "ay",
        "mo",
        "on",
        "sh",
        "all",
        "we",
        "ry",
        "ex",
        "pl",
    ]
    lines = []
    for _ in range(1000):
        words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(7)]
        lines.append(" ".join(words).capitalize() + str(rng.choice([".", ",", "!", "?", ";"])))
    path = tmp_path_factory.mktemp("experiments_corpus") / "synthetic.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_configs_are_found():
    names = {p.stem for p in CONFIGS}
    assert "shakespeare_char" in names
    assert not any(p.parent.name == "benchmarks" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_docstring_records_the_launch_command(path):
    module_doc = path.read_text().split('"""')[1]
    assert f"python -m train --config experiments/{path.name}" in module_doc


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_config_builds_and_its_model_config_validates(path, arg):
    config = load_config_script(f"{path}:{arg}" if arg else str(path))
    if config.get("task") == "contrastive":  # CLIP: two towers, its own keys
        from train.contrastive import clip_config_from

        clip_config_from(config, vocab_size=64)  # validates both towers and the patch shapes
        horizon = config.optimizer.decay_steps or config.train.num_steps
        assert config.optimizer.warmup_steps < horizon
        return
    if config.init_from:  # fine-tuning: the model's shape comes from the checkpoint
        assert config.data.objective == "sft"
        assert config.optimizer.warmup_steps < (
            config.optimizer.decay_steps or config.train.num_steps
        )
        assert arg != "runlocal" or config.train.num_steps <= 50
        return
    # A SentencePiece config brings its vocabulary size; char/byte ones get a small stand-in.
    vocab_size = config.data.vocab_size or 64
    model_cfg = trainer.model_config_from(config, vocab_size)
    assert model_cfg.vocab_size >= vocab_size
    assert config.data.seq_len <= model_cfg.max_seq_len
    assert config.data.batch_size % config.train.grad_accum_steps == 0
    assert config.optimizer.warmup_steps < (config.optimizer.decay_steps or config.train.num_steps)
    if arg == "runlocal":
        assert model_cfg.num_params() < 5_000_000, "runlocal must stay tiny"
        assert config.train.num_steps <= 50


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """A tiny random chat model (HF dir with tokenizer and template) and a chat JSONL, standing
    in for a fine-tuning config's pretrained model and data."""
    import sys

    from models import hf
    from train import sft

    sys.path.insert(0, str(REPO / "tests" / "infer"))
    from tiny_lm import tiny_lm

    lm = tiny_lm()
    directory = tmp_path_factory.mktemp("tiny_chat")
    hf.save_hf_dir(lm.model, directory / "model", tokenizer=lm.tokenizer)
    chat = [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Him."}]
    sft.write_chat_jsonl(directory / "chats.jsonl", [chat] * 8)
    return directory / "model", directory / "chats.jsonl"


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_runlocal_trains_one_step(path, text_file, tiny_chat_model, tmp_path):
    config = load_config_script(f"{path}:runlocal")
    overrides = ["train.num_steps=1"]
    if config.get("init_from"):  # fine-tuning: a tiny chat model and chats stand in for them
        model_dir, chats = tiny_chat_model
        overrides += [f"init_from={model_dir}", f"data.source={chats}"]
        overrides += [f"data.val_source={chats}", "data.seq_len=64"]
    elif config.get("task") != "contrastive":  # contrastive configs bring their own image data
        overrides += [f"data.source={text_file}", "train.sample_tokens=0"]
    if not config.optimizer.decay_steps:  # keep the runlocal schedule (warmup < decay horizon)
        overrides.append(f"optimizer.decay_steps={config.train.num_steps}")
    apply_overrides(config, overrides)
    result = trainer.train_and_evaluate(config, tmp_path)
    assert result.final_step == 1
    assert math.isfinite(result.train_loss) and math.isfinite(result.val_loss)
    assert (tmp_path / "checkpoints" / "1").is_dir()
    if config.train.get("sample_tokens"):
        assert len(result.samples) == 1
