"""The trainer: build model, data and optimizer from a config, then train, evaluate, checkpoint.

`train_and_evaluate(config, workdir)` is the whole run; `python -m train` and notebooks call it.
The train state is a plain pytree {"step", "params", "opt_state"} of arrays, so optax, orbax and
`jax.jit` shardings all see the same thing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from infer.sampling import fill_blank, fill_spans, sample
from models import build_model
from models.config import ModelConfig
from models.decoder import Decoder
from parallel.cpu import cpu_device_count, needs_one_at_a_time, one_at_a_time, use_cpu_cores
from train import finetune
from train.checkpoint import Checkpointer
from train.input_pipeline import DataBundle, build_datasets
from train.metrics import MetricWriter, progress_bar
from train.objectives import BlankInfilling
from train.optimizer import make_optimizer
from train.sft import build_sft_datasets, held_out_conversations

log = logging.getLogger(__name__)

# Dense peak FLOP/s per device for MFU (bf16 tensor cores; fp32 matmul peak for CPU is unknown
# and has to be given as train.peak_flops or measured by the benchmark).
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10": 125e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/inf; the run stopped and the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainResult:
    final_step: int
    train_loss: float
    val_loss: float | None
    metrics_path: pathlib.Path
    samples: list[str]
    elapsed_s: float


# ------------------------------------------------------------------------------------------------
# Building blocks.


def model_config_from(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    """The typed model config of an experiment; vocab_size 0 means the tokenizer's size."""
    values = config.model.to_dict()
    if not values.get("vocab_size"):
        values["vocab_size"] = vocab_size
    if values["vocab_size"] < vocab_size:
        raise ValueError(
            f"model.vocab_size={values['vocab_size']} is smaller than the tokenizer's {vocab_size}"
        )
    if config.data.seq_len > values["max_seq_len"]:
        raise ValueError(
            f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len={values['max_seq_len']}"
        )
    return ModelConfig.from_dict(values)


def cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array | None, z_loss: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean token cross entropy (+ z-loss); returns (total loss, cross entropy, token count).

    Args:
      logits: [B, T, V] float32.
      targets: [B, T] int.
      weights: [B, T] 0/1 mask of tokens that count, or None for all.
      z_loss: coefficient of log(Z)^2 (PaLM, section 5), which keeps the softmax normaliser near 1.
    """
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    token_loss = log_z - target_logit
    if weights is None:
        weights = jnp.ones_like(token_loss)
    count = weights.sum()
    denominator = jnp.maximum(count, 1.0)
    ce = (token_loss * weights).sum() / denominator
    total = ce + z_loss * (jnp.square(log_z) * weights).sum() / denominator
    return total, ce, count


def use_cpu_cores_of(config: ml_collections.ConfigDict) -> int:
    """Applies config.parallel.cpu_devices (parallel/cpu.py) if JAX has not started yet: as many
    single-threaded CPU devices as asked that split the train and eval batches evenly.

    Returns the CPU devices made (1 when none were, or when JAX had already started)."""
    if not config.parallel.get("cpu_devices", 0):
        return 1
    batch_sizes = (
        config.data.batch_size // config.train.grad_accum_steps,
        config.data.get("eval_batch_size") or config.data.batch_size,
    )
    n = cpu_device_count(config.parallel.cpu_devices, batch_sizes)
    return n if use_cpu_cores(n) else 1


def init_train_state(
    model_cfg: ModelConfig, optimizer: optax.GradientTransformation, seed: int
) -> tuple[nnx.GraphDef, dict]:
    model = build_model(model_cfg, nnx.Rngs(params=seed))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": optimizer.init(params),
    }
    return graphdef, state


def merge(graphdef: nnx.GraphDef, params: dict, frozen: dict | None) -> nnx.Module:
    """The model from its trainable params and, when fine-tuning, the frozen rest."""
    return nnx.merge(graphdef, params, frozen) if frozen else nnx.merge(graphdef, params)


def forward(model: nnx.Module, batch: dict, dropout_key: jax.Array | None = None) -> jax.Array:
    """Logits for the batch's targets: a decoder reads "inputs" (with GLM's 2D positions and
    prefix length when present, and only at "loss_positions" when given); an encoder-decoder
    (span corruption) encodes "inputs" and teacher-forces "decoder_inputs"."""
    if "decoder_inputs" in batch:
        return model(batch["inputs"], batch["decoder_inputs"], batch.get("input_mask"), dropout_key)
    extra = {k: batch[k] for k in ("block_positions", "prefix_len") if k in batch}
    if "loss_positions" in batch:  # SFT: logits only where the loss counts (train.sft)
        extra["logits_positions"] = batch["loss_positions"]
    return model(
        batch["inputs"],
        positions=batch.get("positions"),
        segment_ids=batch.get("segment_ids"),
        dropout_key=dropout_key,
        **extra,
    )


def make_train_step(
    graphdef, optimizer, z_loss: float, grad_accum_steps: int, dropout: bool, jit: bool = True
):
    """A jitted step: (state, batch, key, frozen=None) -> (state, metrics). Skips the update on
    NaN/inf. `frozen` is the untrained part of a fine-tuned model (LoRA's base weights); only
    state["params"] get gradients and optimizer updates.

    `jit=False` returns the plain function, for `parallel.train` to jit with shardings.
    """

    def loss_fn(params, batch, key, frozen):
        logits = forward(merge(graphdef, params, frozen), batch, key if dropout else None)
        total, ce, count = cross_entropy(logits, batch["targets"], batch.get("weights"), z_loss)
        return total, (ce, count)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step_fn(state, batch, base_key, frozen=None):
        key = jax.random.fold_in(base_key, state["step"])
        params = state["params"]
        if grad_accum_steps == 1:
            (loss, (ce, _)), grads = grad_fn(params, batch, key, frozen)
        else:
            micro = jax.tree.map(lambda x: x.reshape((grad_accum_steps, -1) + x.shape[1:]), batch)

            def accumulate(carry, xs):
                # Each micro-batch's mean is weighted by its token count, so the result is the
                # full batch's token mean even when masks leave micro-batches uneven.
                micro_batch, i = xs
                (loss, (ce, count)), grads = grad_fn(
                    params, micro_batch, jax.random.fold_in(key, i), frozen
                )
                carry = jax.tree.map(lambda c, x: c + x * count, carry, (loss, ce, grads))
                return carry, count

            zeros = (0.0, 0.0, jax.tree.map(jnp.zeros_like, params))
            (loss, ce, grads), counts = jax.lax.scan(
                accumulate, zeros, (micro, jnp.arange(grad_accum_steps))
            )
            total = jnp.maximum(counts.sum(), 1.0)
            loss, ce, grads = jax.tree.map(lambda x: x / total, (loss, ce, grads))
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def keep_if_finite(new, old):
            # A bad step leaves the state untouched; the host stops the run at its next check.
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        new_state = {
            "step": state["step"] + 1,
            "params": keep_if_finite(new_params, params),
            "opt_state": keep_if_finite(opt_state, state["opt_state"]),
        }
        metrics = {"loss": loss, "cross_entropy": ce, "grad_norm": grad_norm, "finite": finite}
        return new_state, metrics

    return jax.jit(step_fn, donate_argnums=(0,)) if jit else step_fn


def make_eval_step(graphdef):
    @jax.jit
    def eval_step(params, batch, frozen=None):
        logits = forward(merge(graphdef, params, frozen), batch)
        _, ce, count = cross_entropy(logits, batch["targets"], batch.get("weights"), 0.0)
        return ce * count, count

    return eval_step


def evaluate(eval_step, params, batches: list[dict], frozen=None) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over the validation batches."""
    total, count = 0.0, 0.0
    for batch in batches:
        loss_sum, n = eval_step(params, batch, frozen)
        total, count = total + loss_sum, count + n
    loss = float(total / count)
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}


def peak_flops(config_value: float) -> float | None:
    if config_value:
        return config_value * jax.device_count()
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops * jax.device_count()
    return None


def sample_text(graphdef, params, data: DataBundle, config, seed: int = 0) -> str:
    tcfg = config.train
    model = nnx.merge(graphdef, params)
    if isinstance(data.span_corruption, BlankInfilling):
        return fill_blank_text(model, data)
    if data.span_corruption is not None:
        return fill_spans_text(model, data)
    prompt = data.tokenizer.encode(tcfg.sample_prompt) or [0]
    tokens = sample(
        model,
        prompt,
        tcfg.sample_tokens,
        temperature=tcfg.sample_temperature,
        top_k=tcfg.sample_top_k or None,
        seed=seed,
    )
    return tcfg.sample_prompt + data.tokenizer.decode(tokens)


def answer_eval(graphdef, params, frozen, data: DataBundle, config) -> tuple[float, list]:
    """Greedy replies to the first train.answer_eval held-out conversations (fine-tuning)."""
    conversations = held_out_conversations(config.data)[: config.train.answer_eval]
    model = merge(graphdef, params, frozen)
    return finetune.answer_accuracy(
        model, data.tokenizer, conversations, config.train.answer_max_tokens
    )


def fill_spans_text(model, data: DataBundle) -> str:
    """A held-out window with its blanks, and the model's greedy fill of them (span corruption)."""
    span = data.span_corruption
    batch = data.eval_batches[len(data.eval_batches) // 2]  # mid-play, not a title page
    inputs = batch["inputs"][:1]
    filled = fill_spans(model, inputs, span.decoder_start_id, span.target_length)[0]
    tokenizer = data.tokenizer

    def show(ids) -> str:
        parts, plain = [], []
        for token in ids:
            if span.is_sentinel(int(token)):
                parts.append(tokenizer.decode(plain) + f"<S{int(token) - span.sentinel_start}>")
                plain = []
            elif int(token) < tokenizer.vocab_size:
                plain.append(int(token))
        return "".join(parts) + tokenizer.decode(plain)

    truth = span.reconstruct(inputs[0], batch["targets"][0])
    guess = span.reconstruct(inputs[0], filled)
    return (
        f"input:  {show(inputs[0])}\ntarget: {show(batch['targets'][0])}\n"
        f"model:  {show(filled)}\nfilled: {tokenizer.decode(guess)}\n"
        f"truth:  {tokenizer.decode(truth)}"
    )


def fill_blank_text(model, data: DataBundle) -> str:
    """A held-out window with one blank, and the model's greedy fill of it (GLM)."""
    objective = data.span_corruption
    tokenizer = data.tokenizer
    middle = data.eval_batches[len(data.eval_batches) // 2]  # mid-play, not a title page
    example = {k: v[0] for k, v in middle.items()}
    n = int(example["prefix_len"])
    context = example["inputs"][:n]
    masks = np.flatnonzero(context == objective.mask_id)
    truth = objective.reconstruct(example)
    first = int(masks[0])
    filled = fill_blank(model, context, first, objective.start_id, objective.end_id, 12)

    def text(ids) -> str:
        return tokenizer.decode([int(t) for t in ids if int(t) < tokenizer.vocab_size])

    shown = "".join("[MASK]" if int(t) == objective.mask_id else text([t]) for t in context)
    return (
        f"context: {shown}\nmodel fills the first [MASK] with: {text(filled)!r}\n"
        f"truth:   {text(truth)}"
    )


# ------------------------------------------------------------------------------------------------
# The run.


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> TrainResult:
    """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one."""
    if config.get("task", "lm") == "contrastive":  # CLIP-style image-text training
        from train.contrastive import train_and_evaluate as train_contrastive

        return train_contrastive(config, workdir)
    start_time = time.time()
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tcfg = config.train
    if config.data.batch_size % tcfg.grad_accum_steps:
        raise ValueError(
            f"data.batch_size={config.data.batch_size} is not divisible by "
            f"train.grad_accum_steps={tcfg.grad_accum_steps}"
        )
    if (n := use_cpu_cores_of(config)) > 1 and jax.default_backend() == "cpu":
        print(f"CPU: {n} single-threaded devices, data parallel over the cores", flush=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    optimizer, schedule = make_optimizer(config.optimizer, tcfg.num_steps)  # fail before data
    process = (jax.process_index(), jax.process_count())
    mesh = None
    if config.init_from:  # fine-tuning: the architecture and tokenizer come from the checkpoint
        if config.data.objective != "sft":
            raise ValueError("init_from (fine-tuning) supports data.objective='sft' only")
        if jax.device_count() > 1:
            raise ValueError("fine-tuning (init_from) runs on one device; several are visible")
        model, model_cfg, tokenizer = finetune.load_base(config)
        data = build_sft_datasets(config.data, tokenizer, *process)
        tokenizer.save_hf(workdir / "tokenizer")
    else:
        if config.data.objective == "sft":
            raise ValueError("data.objective='sft' needs init_from: a pretrained chat model")
        data = build_datasets(config.data, workdir, *process)
        model_cfg = model_config_from(config, data.vocab_size or data.tokenizer.vocab_size)
        if jax.device_count() == 1:
            model = build_model(model_cfg, nnx.Rngs(params=tcfg.seed))
        else:  # the state is created straight into its shardings over a mesh (parallel/)
            from parallel.mesh import make_mesh
            from parallel.train import (
                check_batch_size,
                init_sharded_train_state,
                make_sharded_train_step,
                shard_batch,
            )

            if config.lora.rank or config.model.get("quant", "none") != "none":
                raise ValueError("LoRA and quantized training run on one device")
            mesh, rules = make_mesh(config.parallel.mesh), config.parallel.rules
            if jax.process_count() == 1:  # the steps get host batches (below): check them here
                check_batch_size(config.data.batch_size, mesh, rules)
            graphdef, state, shardings = init_sharded_train_state(
                model_cfg, optimizer, tcfg.seed, mesh, rules
            )
            params, frozen = state["params"], {}
            print(f"Mesh {dict(mesh.shape)}, rules {rules!r}", flush=True)
    if mesh is None:
        graphdef, params, frozen = finetune.prepare(model, config, tcfg.seed)
        del model  # its arrays live on in params and frozen
        state = {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": optimizer.init(params),
        }
    (workdir / "model_config.json").write_text(json.dumps(model_cfg.to_dict(), indent=2))

    checkpointer = Checkpointer(
        workdir / "checkpoints", keep=tcfg.keep_checkpoints, async_save=tcfg.async_checkpoint
    )
    train_iter = iter(data.train_ds)
    start_step = 0
    if (latest := checkpointer.latest_step()) is not None:
        state, data_state, _ = checkpointer.restore(latest, state)
        train_iter.set_state(data_state)
        start_step = int(state["step"])
        print(f"Resumed from step {start_step} ({workdir / 'checkpoints'})", flush=True)

    dropout = model_cfg.dropout_rate > 0 or config.lora.dropout > 0  # both need a key
    if mesh is None:
        train_step = make_train_step(
            graphdef, optimizer, tcfg.z_loss, tcfg.grad_accum_steps, dropout
        )
    else:
        from parallel.pipeline import PipelineConfig

        pcfg = config.parallel
        pipeline = None
        if pcfg.pipeline_microbatches:
            pipeline = PipelineConfig(
                pcfg.pipeline_microbatches, pcfg.pipeline_schedule, pcfg.pipeline_repeats
            )
        sharded_step = make_sharded_train_step(
            graphdef, optimizer, mesh, rules, shardings, z_loss=tcfg.z_loss,
            grad_accum_steps=tcfg.grad_accum_steps, dropout=dropout, pipeline=pipeline,
        )  # fmt: skip

        def train_step(state, batch, key, frozen):
            # With one process the step splits host arrays by its in_shardings itself, 0.65 ms
            # a call faster than making global arrays first; with several, each holds its rows.
            if jax.process_count() > 1:
                batch = shard_batch(batch, mesh, rules)
            return sharded_step(state, batch, key)

    eval_step = make_eval_step(graphdef)
    if mesh is not None and needs_one_at_a_time(mesh.devices.flat):
        train_step, eval_step = one_at_a_time(train_step), one_at_a_time(eval_step)
    eval_batches = data.eval_batches
    if mesh is not None:  # global arrays: with several processes each holds only its rows
        eval_batches = [shard_batch(b, mesh, rules) for b in eval_batches]
    base_key = jax.random.key(tcfg.seed + 1)
    tokens_per_step = config.data.batch_size * config.data.seq_len
    flops_per_step = model_cfg.flops_per_token(config.data.seq_len) * tokens_per_step
    peak = peak_flops(tcfg.peak_flops)
    trainable = finetune.count_params(params)
    # The base's parameter count (quantized arrays pack several weights per element), plus adapters.
    total_params = model_cfg.num_params() + (trainable if config.lora.rank else 0)
    print(
        f"Model: {total_params / 1e6:.2f}M parameters ({trainable / total_params:.2%} trained), "
        f"vocab {model_cfg.vocab_size}; train {data.num_train_tokens:,} tokens, "
        f"val {data.num_val_tokens:,} tokens",
        flush=True,
    )

    writer = MetricWriter(workdir, tensorboard=tcfg.tensorboard)
    answers_before = None
    if config.init_from and start_step == 0:  # the pretrained model's numbers, to compare with
        before = evaluate(eval_step, state["params"], eval_batches, frozen)
        if tcfg.answer_eval:
            answers_before = answer_eval(graphdef, state["params"], frozen, data, config)
            before["answer_exact_match"] = answers_before[0]
        writer.write(0, before)
        print(f"Before fine-tuning: {before}", flush=True)
    bar = progress_bar(tcfg.num_steps, start_step, enabled=tcfg.progress_bar)
    last_metrics: dict[str, Any] = {}
    val_loss = None
    window_start, window_steps = time.perf_counter(), 0

    finite_flags: list[jax.Array] = []  # one per step since the last check; read without a sync

    def check_finite(done: int) -> None:
        # A skipped (non-finite) step anywhere since the last check stops the run.
        flags = jax.device_get(finite_flags)
        finite_flags.clear()
        if not all(flags):
            bad = done - len(flags) + 1 + flags.index(False)
            raise NonFiniteLossError(
                f"NaN or inf in the loss or gradient at step {bad}; stopping. That step was not "
                f"applied and nothing after it is saved: the last good checkpoint is step "
                f"{checkpointer.latest_step()} in {workdir / 'checkpoints'}."
            )

    def save(step: int) -> None:
        checkpointer.save(step, state, train_iter.get_state(), {"step": step, "val_loss": val_loss})

    try:
        for step in range(start_step, tcfg.num_steps):
            batch = next(train_iter)
            state, metrics = train_step(state, batch, base_key, frozen)
            finite_flags.append(metrics["finite"])
            if step == start_step:  # the first call compiles: keep it out of the step times
                jax.block_until_ready(metrics)
                compiled = time.perf_counter() - window_start
                writer.write(
                    step + 1,
                    {"compile_time_s": compiled, "params": total_params, "trained": trainable},
                )
                window_start = time.perf_counter()
            else:
                window_steps += 1
            done = step + 1
            is_last = done == tcfg.num_steps
            if done % tcfg.log_every == 0 or is_last:
                check_finite(done)
                metrics = jax.device_get(metrics)
                last_metrics = {
                    "loss": metrics["loss"],
                    "cross_entropy": metrics["cross_entropy"],
                    "grad_norm": metrics["grad_norm"],
                    "learning_rate": schedule(step),
                }
                if window_steps:  # steps timed since the last log (compilation excluded)
                    step_time = (time.perf_counter() - window_start) / window_steps
                    last_metrics["step_time_s"] = step_time
                    last_metrics["tokens_per_s"] = tokens_per_step / step_time
                    if peak:
                        last_metrics["mfu"] = flops_per_step / step_time / peak
                    bar.set_postfix(
                        loss=f"{metrics['loss']:.3f}", tok_s=f"{tokens_per_step / step_time:,.0f}"
                    )
                writer.write(done, last_metrics)
                window_start, window_steps = time.perf_counter(), 0
            if done % tcfg.eval_every == 0 or is_last:
                eval_metrics = evaluate(eval_step, state["params"], eval_batches, frozen)
                val_loss = eval_metrics["val_loss"]
                writer.write(done, eval_metrics)
                bar.write(
                    f"step {done}: train loss {last_metrics.get('loss', float('nan')):.4f}, "
                    f"val loss {val_loss:.4f} ({time.time() - start_time:.0f} s)"
                )
                window_start, window_steps = time.perf_counter(), 0  # eval time is not step time
            if done % tcfg.checkpoint_every == 0 or is_last:
                check_finite(done)
                save(done)
            bar.update(1)
        if config.init_from and tcfg.answer_eval:
            accuracy, rows = answer_eval(graphdef, state["params"], frozen, data, config)
            writer.write(tcfg.num_steps, {"answer_exact_match": accuracy})
            report = {"after": {"exact_match": accuracy, "answers": rows}}
            if answers_before is not None:
                report["before"] = {"exact_match": answers_before[0], "answers": answers_before[1]}
            (workdir / "answers.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
            print(
                f"Held-out exact answers: {accuracy:.1%} ({workdir / 'answers.json'})", flush=True
            )
    finally:
        bar.close()
        checkpointer.close()
        writer.close()

    samples = []
    if tcfg.sample_tokens and not config.init_from:
        text = sample_text(graphdef, state["params"], data, config, seed=tcfg.seed)
        samples.append(text)
        print("-" * 30 + " sample " + "-" * 30 + f"\n{text}\n" + "-" * 68, flush=True)
    if config.lora.rank and jax.process_index() == 0:
        finetune.save_adapter(merge(graphdef, state["params"], frozen), config, workdir / "adapter")
    elapsed = time.time() - start_time
    print(f"Done: step {tcfg.num_steps}, val loss {val_loss}, {elapsed:.0f} s", flush=True)
    return TrainResult(
        final_step=int(state["step"]),
        train_loss=float(last_metrics.get("loss", np.nan)),
        val_loss=val_loss,
        metrics_path=workdir / "metrics.jsonl",
        samples=samples,
        elapsed_s=elapsed,
    )


def load_for_inference(workdir: str | pathlib.Path) -> tuple[Decoder, Any]:
    """Rebuilds the trained model (latest checkpoint) and its tokenizer from a run directory."""
    from train.tokenizers import load_tokenizer

    workdir = pathlib.Path(workdir)
    model_cfg = ModelConfig.from_dict(json.loads((workdir / "model_config.json").read_text()))
    model = Decoder(model_cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    with Checkpointer(workdir / "checkpoints", read_only=True) as checkpointer:
        step = checkpointer.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
        restored = checkpointer.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
        )
    params = jax.tree.map(jnp.asarray, restored.state["params"])
    model = nnx.merge(graphdef, params)
    return model, load_tokenizer(workdir / "tokenizer")
