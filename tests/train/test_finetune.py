"""Fine-tuning through the trainer (`config.init_from`): a tiny pretrained chat model trained on
chat JSONL, fully and with LoRA, with before/after evaluation, checkpoints and resume."""

import json
import pathlib
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from models import hf
from train import sft
from train.defaults import base_config
from train.trainer import train_and_evaluate

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "infer"))
from tiny_lm import tiny_lm  # noqa: E402

pytestmark = pytest.mark.usefixtures("jax_compile_cache")

FACTS = [("Who wrote Hamlet?", "Shakespeare"), ("Where was he born?", "Stratford")] * 6


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> pathlib.Path:
    """A tiny random chat model saved as a Hugging Face dir, tokenizer and template included."""
    lm = tiny_lm()
    path = tmp_path_factory.mktemp("tiny_chat")
    hf.save_hf_dir(lm.model, path, tokenizer=lm.tokenizer)
    return path


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    directory = tmp_path_factory.mktemp("chats")
    conversations = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in FACTS
    ]
    sft.write_chat_jsonl(directory / "train.jsonl", conversations)
    sft.write_chat_jsonl(directory / "val.jsonl", conversations[:2])
    return directory / "train.jsonl", directory / "val.jsonl"


def sft_config(pretrained, chats, **lora):
    config = base_config()
    config.init_from = str(pretrained)
    config.data.objective = "sft"
    config.data.source, config.data.val_source = map(str, chats)
    config.data.seq_len, config.data.batch_size = 96, 2
    config.optimizer.learning_rate, config.optimizer.warmup_steps = 3e-3, 1
    config.optimizer.weight_decay = 0.0
    config.train.num_steps = 8
    config.train.log_every = config.train.eval_every = config.train.checkpoint_every = 4
    config.train.answer_eval, config.train.answer_max_tokens = 2, 4
    config.train.progress_bar = config.train.tensorboard = False
    for key, value in lora.items():
        config.lora[key] = value
    return config


def metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_full_fine_tuning_learns_the_replies(pretrained, chats, tmp_path):
    result = train_and_evaluate(sft_config(pretrained, chats), tmp_path)
    rows = metrics(tmp_path)
    before = next(r for r in rows if r["step"] == 0 and "val_loss" in r)
    assert "answer_exact_match" in before
    assert result.val_loss < 0.8 * before["val_loss"]
    report = json.loads((tmp_path / "answers.json").read_text())
    assert len(report["before"]["answers"]) == len(report["after"]["answers"]) == 2
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()
    assert not (tmp_path / "adapter").exists()


def test_sft_needs_a_pretrained_model(chats, tmp_path):
    config = base_config()
    config.data.objective = "sft"
    with pytest.raises(ValueError, match="needs init_from"):
        train_and_evaluate(config, tmp_path)


def test_quantized_base_needs_lora(pretrained, chats, tmp_path):
    config = sft_config(pretrained, chats)
    if "quant" not in config.model:
        pytest.skip("ModelConfig has no quant field yet")
    config.model.quant = "int8"
    with pytest.raises(ValueError, match="needs LoRA"):
        train_and_evaluate(config, tmp_path)


def test_lora_trains_only_adapters_saves_peft_and_resumes(pretrained, chats, tmp_path):
    pytest.importorskip("models.lora")
    from train.checkpoint import Checkpointer

    config = sft_config(pretrained, chats, rank=4, alpha=8.0)
    config.train.num_steps = 4
    first = train_and_evaluate(config, tmp_path)
    with Checkpointer(tmp_path / "checkpoints", read_only=True) as checkpointer:
        saved = checkpointer.manager.restore(
            4, args=ocp.args.Composite(state=ocp.args.StandardRestore())
        )
    leaves = [np.asarray(x).size for x in jax.tree.leaves(saved.state["params"])]
    base = tiny_lm().model.cfg.num_params()
    assert 0 < sum(leaves) < 0.2 * base  # only adapter parameters are checkpointed
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()

    config.train.num_steps = 8  # resume from step 4: the base is reloaded, adapters restored
    resumed = train_and_evaluate(config, tmp_path)
    assert resumed.final_step == 8 and np.isfinite(resumed.val_loss)
    assert first.final_step == 4
