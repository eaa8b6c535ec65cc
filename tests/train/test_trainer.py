"""Tests for train/trainer.py: learning, exact resume, NaN handling, crash-safe checkpoints,
gradient accumulation, metrics and reloading for inference.

Every run trains a tiny char-level model on a short paragraph written to a temporary file, so
nothing here touches the network.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from infer.sampling import sample
from models.decoder import Decoder
from train import trainer
from train.checkpoint import Checkpointer
from train.defaults import base_config

# Most runs share one tiny config, so they share one compiled train step.
pytestmark = pytest.mark.usefixtures("jax_compile_cache")

PARAGRAPH = (
    "The quick brown fox jumps over the lazy dog, and the dog sleeps on.\n"
    "A small model learns this short text by heart when it sees it again and again.\n"
    "Pack my box with five dozen liquor jugs; how vexingly quick daft zebras jump!\n"
)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> pathlib.Path:
    """About 9 KB of a repeated paragraph: train on the first 90%, validate on the rest."""
    path = tmp_path_factory.mktemp("corpus") / "paragraph.txt"
    path.write_text(PARAGRAPH * 40)
    return path


def tiny_config(corpus: pathlib.Path, **train):
    """A 2-layer, 32-wide char model; `train` overrides fields of config.train."""
    config = base_config()
    config.data.source = str(corpus)
    config.data.tokenizer = "char"
    config.data.seq_len = 32
    config.data.batch_size = 8
    config.data.eval_batches = 2
    m = config.model
    m.num_layers, m.embed_dim, m.num_heads, m.mlp_dim, m.max_seq_len = 2, 32, 4, 64, 32
    m.dropout_rate = 0.1  # so that resuming must also reproduce the per-step dropout keys
    config.optimizer.learning_rate = 1e-2
    config.optimizer.min_learning_rate = 1e-3
    config.optimizer.warmup_steps = 2
    # Fixed, so that the schedule (and the compiled step) does not depend on train.num_steps.
    config.optimizer.decay_steps = 60
    t = config.train
    # Every run uses both, so that resuming and NaN handling are checked with them too.
    t.z_loss, t.grad_accum_steps = 1e-4, 2
    t.num_steps, t.log_every, t.eval_every, t.checkpoint_every = 12, 1, 1000, 4
    t.sample_tokens, t.progress_bar = 0, False
    for key, value in train.items():
        setattr(t, key, value)
    return config


def read_metrics(workdir) -> dict[int, dict]:
    """Training records (those with a loss) of metrics.jsonl by step; the last one wins."""
    records = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            records[record["step"]] = record
    return records


# The runs that resumed runs are compared against. Module-scoped and built under
# `jax_compile_cache`, so that they compile with the same XLA settings as the runs in the tests
# (pytest sets up session fixtures before module ones, whatever the order of the tests).
@pytest.fixture(scope="module")
def run_a(corpus_file, tmp_path_factory, jax_compile_cache):
    """12 uninterrupted steps, checkpoints at 4, 8, 12, and a sample at the end."""
    workdir = tmp_path_factory.mktemp("run_a")
    result = trainer.train_and_evaluate(tiny_config(corpus_file, sample_tokens=16), workdir)
    return workdir, result


@pytest.fixture(scope="module")
def run_b_to_8(corpus_file, tmp_path_factory, jax_compile_cache):
    """The same run stopped at step 8 (same schedule: decay_steps is fixed)."""
    workdir = tmp_path_factory.mktemp("run_b")
    result = trainer.train_and_evaluate(tiny_config(corpus_file, num_steps=8), workdir)
    assert result.final_step == 8
    return workdir


# ------------------------------------------------------------------------------------------------
# Whole runs.


def test_loss_falls_on_a_repeated_paragraph(corpus_file, tmp_path):
    config = tiny_config(
        corpus_file, num_steps=60, log_every=10, checkpoint_every=1000, eval_every=60
    )
    result = trainer.train_and_evaluate(config, tmp_path)
    vocab = len(set(PARAGRAPH)) + 1  # + <unk>
    first = read_metrics(tmp_path)[10]["loss"]
    assert result.final_step == 60
    assert result.train_loss < 0.6 * math.log(vocab), (first, result.train_loss)
    assert result.train_loss < first
    assert result.val_loss is not None and result.val_loss < 0.6 * math.log(vocab)


def test_resume_equals_uninterrupted_run(run_a, run_b_to_8, corpus_file, tmp_path, capsys):
    workdir_a, result_a = run_a
    workdir_b = tmp_path / "b"
    shutil.copytree(run_b_to_8, workdir_b)
    result_b = trainer.train_and_evaluate(tiny_config(corpus_file, num_steps=12), workdir_b)
    assert "Resumed from step 8" in capsys.readouterr().out
    assert result_b.final_step == 12
    losses_a, losses_b = read_metrics(workdir_a), read_metrics(workdir_b)
    assert sorted(losses_b) == list(range(1, 13))
    for step in range(1, 13):
        # Bitwise: same params, optimizer state, data position and dropout keys after resume.
        assert losses_b[step]["loss"] == losses_a[step]["loss"], step
        assert losses_b[step]["grad_norm"] == losses_a[step]["grad_norm"], step
        assert losses_b[step]["learning_rate"] == losses_a[step]["learning_rate"], step
    assert result_b.val_loss == result_a.val_loss


def test_leftover_partial_checkpoint_is_ignored_on_resume(
    run_a, run_b_to_8, corpus_file, tmp_path, capsys
):
    """A crash while saving step 12 leaves orbax's tmp directory; resume from step 8 anyway."""
    workdir = tmp_path / "b"
    shutil.copytree(run_b_to_8, workdir)
    checkpoints = workdir / "checkpoints"
    partial = checkpoints / "12.orbax-checkpoint-tmp"
    shutil.copytree(checkpoints / "8", partial)
    for path in sorted((partial / "state").rglob("*")):  # half-written array data
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (checkpoints / "16.orbax-checkpoint-tmp-1700000000").mkdir()  # older orbax naming

    with Checkpointer(checkpoints, read_only=True) as reader:
        assert reader.latest_step() == 8
    assert partial.is_dir()  # a reader leaves tmp directories alone
    result = trainer.train_and_evaluate(tiny_config(corpus_file, num_steps=12), workdir)
    assert "Resumed from step 8" in capsys.readouterr().out
    assert result.final_step == 12
    losses_a, losses = read_metrics(run_a[0]), read_metrics(workdir)
    assert [losses[s]["loss"] for s in range(9, 13)] == [losses_a[s]["loss"] for s in range(9, 13)]
    assert (checkpoints / "12").is_dir()
    assert not any(".orbax-checkpoint-tmp" in p.name for p in checkpoints.iterdir())


def test_non_finite_loss_stops_the_run_and_keeps_a_finite_checkpoint(corpus_file, tmp_path):
    config = tiny_config(corpus_file, num_steps=12, checkpoint_every=1)
    config.optimizer.learning_rate = 1e30  # step 1 has lr 0 (warmup), then the weights explode
    config.optimizer.grad_clip = 0.0
    with pytest.raises(trainer.NonFiniteLossError) as info:
        trainer.train_and_evaluate(config, tmp_path)
    message = str(info.value)
    assert "nan" in message.lower() or "inf" in message.lower(), message
    assert "checkpoint" in message and str(tmp_path / "checkpoints") in message

    with Checkpointer(tmp_path / "checkpoints", read_only=True) as checkpointer:
        latest = checkpointer.latest_step()
        bad_step = max(read_metrics(tmp_path), default=0) + 1
        assert latest is not None and 1 <= latest < bad_step
        assert f"step {latest}" in message
        restored = checkpointer.manager.restore(  # raw arrays, no template needed
            latest, args=ocp.args.Composite(state=ocp.args.StandardRestore())
        )
    leaves = jax.tree.leaves(restored.state["params"])
    assert leaves and all(np.isfinite(np.asarray(leaf)).all() for leaf in leaves)


def test_a_transient_non_finite_step_between_checks_stops_the_run(
    corpus_file, tmp_path, monkeypatch
):
    """The step skips a non-finite update and promises that the host stops at the next check.
    A NaN at step 2 (one bad batch) followed by finite steps 3 and 4 must not pass the check
    at step 4 unnoticed: the run must stop, not silently train on."""
    real_make_train_step = trainer.make_train_step

    def make_train_step_with_one_bad_batch(*args, **kwargs):
        step_fn = real_make_train_step(*args, **kwargs)

        def step_with_one_bad_batch(state, batch, key, frozen=None):
            if int(state["step"]) != 1:
                return step_fn(state, batch, key, frozen)
            # Poison a weight for this one step: the real step sees a NaN loss and skips the
            # update; then restore it, as if only this batch had been bad.
            scale = state["params"]["final_norm"]["scale"]
            good = jnp.array(scale)  # a copy: the step donates its input state
            state["params"]["final_norm"]["scale"] = scale.at[0].set(jnp.nan)
            state, metrics = step_fn(state, batch, key, frozen)
            assert not bool(metrics["finite"])
            state["params"]["final_norm"]["scale"] = good
            return state, metrics

        return step_with_one_bad_batch

    monkeypatch.setattr(trainer, "make_train_step", make_train_step_with_one_bad_batch)
    config = tiny_config(corpus_file, num_steps=8, log_every=4, checkpoint_every=4)
    with pytest.raises(trainer.NonFiniteLossError):
        trainer.train_and_evaluate(config, tmp_path)


def test_non_finite_before_the_first_save_leaves_no_checkpoint(corpus_file, tmp_path):
    config = tiny_config(corpus_file, num_steps=12, checkpoint_every=1000)
    config.optimizer.learning_rate = 1e30
    config.optimizer.grad_clip = 0.0
    with pytest.raises(trainer.NonFiniteLossError):
        trainer.train_and_evaluate(config, tmp_path)
    with Checkpointer(tmp_path / "checkpoints", read_only=True) as checkpointer:
        assert checkpointer.latest_step() is None


def test_batch_must_split_into_micro_batches(corpus_file, tmp_path):
    with pytest.raises(ValueError, match="grad_accum_steps=3"):
        trainer.train_and_evaluate(tiny_config(corpus_file, grad_accum_steps=3), tmp_path)


def test_metrics_and_tensorboard_files(run_a):
    workdir, result = run_a
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["z_loss"] > 0 and config["train"]["grad_accum_steps"] == 2
    records = read_metrics(workdir)
    assert sorted(records) == list(range(1, 13))
    for step, record in records.items():
        keys = ["loss", "cross_entropy", "learning_rate", "grad_norm"]
        if step > 1:  # step 1 compiles; its time is logged as compile_time_s instead
            keys += ["tokens_per_s", "step_time_s"]
        for key in keys:
            assert isinstance(record[key], float) and math.isfinite(record[key]), (step, key)
        assert record.get("tokens_per_s", 1.0) > 0 and record.get("step_time_s", 1.0) > 0
        assert record["loss"] > record["cross_entropy"]  # + the z-loss term
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("compile_time_s" in r and r["step"] == 1 for r in lines)
    # Warmup from 0 to the peak over 2 steps, then cosine decay (towards the minimum at 60).
    lrs = [records[s]["learning_rate"] for s in range(1, 13)]
    np.testing.assert_allclose(lrs[:3], [0.0, 5e-3, 1e-2], rtol=1e-6)
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:], strict=False))  # cosine decay
    assert result.train_loss == records[12]["loss"]
    evals = [r for r in lines if "val_loss" in r]
    assert [e["step"] for e in evals] == [12] and evals[0]["val_loss"] == result.val_loss
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert (workdir / "config.json").exists() and (workdir / "model_config.json").exists()


def test_load_for_inference_reproduces_the_training_sample(run_a):
    workdir, result = run_a
    model, tokenizer = trainer.load_for_inference(workdir)
    assert isinstance(model, Decoder) and tokenizer.kind == "char"
    assert model.cfg.vocab_size == tokenizer.vocab_size
    # The trainer sampled 16 tokens after "\n" with seed train.seed=0 and temperature 0.8.
    config = tiny_config(pathlib.Path("unused"))
    tokens = sample(
        model,
        tokenizer.encode(config.train.sample_prompt),
        16,
        temperature=config.train.sample_temperature,
        seed=0,
    )
    assert result.samples == [config.train.sample_prompt + tokenizer.decode(tokens)]

    prompt = tokenizer.encode("The quick ")
    first = sample(model, prompt, 16, temperature=0.8, seed=7)
    assert sample(model, prompt, 16, temperature=0.8, seed=7) == first
    assert len(first) == 16 and all(0 <= t < tokenizer.vocab_size for t in first)
    assert sample(model, prompt, 16, temperature=0.8, seed=8) != first  # 16 draws, 36 chars


def test_load_for_inference_without_checkpoint_fails(run_a, tmp_path):
    shutil.copy(run_a[0] / "model_config.json", tmp_path / "model_config.json")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        trainer.load_for_inference(tmp_path)


def test_reading_a_run_leaves_its_save_in_progress_alone(run_b_to_8, tmp_path):
    """Loading the latest checkpoint (a notebook, an eval job) while the run is saving step 12
    must not delete the run's tmp directory, and a reader cannot save."""
    workdir = tmp_path / "b"
    shutil.copytree(run_b_to_8, workdir)
    in_progress = workdir / "checkpoints" / "12.orbax-checkpoint-tmp"
    shutil.copytree(workdir / "checkpoints" / "8", in_progress)
    trainer.load_for_inference(workdir)
    with Checkpointer(workdir / "checkpoints", read_only=True) as reader:
        assert reader.latest_step() == 8
        with pytest.raises(PermissionError, match="read-only"):
            reader.save(12, {}, {}, {})
    time.sleep(0.5)  # a writer's clean-up runs in a background thread
    assert in_progress.is_dir() and (in_progress / "state").is_dir()


# ------------------------------------------------------------------------------------------------
# Pieces: the loss and the train step on a fixed batch.


def test_cross_entropy_matches_log_softmax_and_masks_weights():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 7, (2, 5)), jnp.int32)
    weights = jnp.asarray(rng.integers(0, 2, (2, 5)), jnp.float32).at[0, 0].set(1.0)
    token_loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    cross_entropy = jax.jit(trainer.cross_entropy, static_argnums=3)
    total, ce, count = cross_entropy(logits, targets, None, 0.0)
    np.testing.assert_allclose(ce, token_loss.mean(), rtol=1e-6)
    assert total == ce and count == 10
    total, ce, count = cross_entropy(logits, targets, weights, 0.1)
    np.testing.assert_allclose(ce, (token_loss * weights).sum() / weights.sum(), rtol=1e-6)
    log_z = jax.nn.logsumexp(logits, -1)
    z_term = 0.1 * (log_z**2 * weights).sum() / weights.sum()
    np.testing.assert_allclose(total, ce + z_term, rtol=1e-6)


@pytest.fixture(scope="module")
def sgd_steps(corpus_file):
    """Plain-SGD train steps (new params = params - grads, so params compare grads) with
    z_loss 1e-3 and 1 or 2 micro-batches, compiled once, on one fixed batch."""
    config = tiny_config(corpus_file)
    model_cfg = trainer.model_config_from(config, vocab_size=40)
    optimizer = optax.sgd(1.0)
    graphdef, state = trainer.init_train_state(model_cfg, optimizer, seed=0)
    host_state = jax.device_get(state)
    rng = np.random.default_rng(0)
    return types.SimpleNamespace(
        fresh_state=lambda: jax.tree.map(jnp.array, host_state),  # steps donate their state
        batch={
            "inputs": jnp.asarray(rng.integers(0, 40, (8, 32)), jnp.int32),
            "targets": jnp.asarray(rng.integers(0, 40, (8, 32)), jnp.int32),
            # All ones: the same loss as no weights (one compiled step serves every test).
            "weights": jnp.ones((8, 32), jnp.float32),
        },
        step={
            accum: trainer.make_train_step(graphdef, optimizer, 1e-3, accum, dropout=False)
            for accum in (1, 2)
        },
    )


def _full_and_accumulated(sgd_steps, batch):
    key = jax.random.key(0)
    return [jax.device_get(sgd_steps.step[n](sgd_steps.fresh_state(), batch, key)) for n in (1, 2)]


def _assert_params_close(actual, expected):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), actual, expected)


def test_grad_accumulation_equals_full_batch(sgd_steps):
    (full, full_metrics), (accum, accum_metrics) = _full_and_accumulated(sgd_steps, sgd_steps.batch)
    assert int(accum["step"]) == 1 and bool(accum_metrics["finite"])
    # The z-loss term is averaged over micro-batches like the cross entropy.
    np.testing.assert_allclose(accum_metrics["loss"], full_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(accum_metrics["grad_norm"], full_metrics["grad_norm"], rtol=1e-5)
    _assert_params_close(accum["params"], full["params"])
    initial = jax.tree.leaves(sgd_steps.fresh_state()["params"])
    moved = max(
        float(np.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(full["params"]), initial, strict=True)
    )
    assert moved > 1e-4  # the update is not trivially zero


def test_grad_accumulation_with_a_loss_mask_equals_full_batch(sgd_steps):
    """With `weights` (padding / loss masks), micro-batches hold different numbers of counted
    tokens; the accumulated gradient must still be that of the full batch's token mean."""
    weights = np.ones((8, 32), np.float32)
    weights[:4, 4:] = 0.0  # the first micro-batch counts 16 tokens, the second 128
    batch = {**sgd_steps.batch, "weights": jnp.asarray(weights)}
    (full, full_metrics), (accum, accum_metrics) = _full_and_accumulated(sgd_steps, batch)
    np.testing.assert_allclose(accum_metrics["loss"], full_metrics["loss"], rtol=1e-6)
    _assert_params_close(accum["params"], full["params"])


def test_train_step_skips_a_non_finite_update(sgd_steps):
    state = sgd_steps.fresh_state()
    # Poison one weight: the loss becomes NaN and the step must leave params untouched.
    scale = state["params"]["final_norm"]["scale"]
    state["params"]["final_norm"]["scale"] = scale.at[0].set(jnp.nan)
    before = jax.device_get(state["params"])
    new_state, metrics = jax.device_get(
        sgd_steps.step[1](state, sgd_steps.batch, jax.random.key(0))
    )
    assert not bool(metrics["finite"]) and int(new_state["step"]) == 1
    jax.tree.map(np.testing.assert_array_equal, new_state["params"], before)
