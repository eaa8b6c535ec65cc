"""Contrastive image-text training (CLIP, SigLIP): the losses, their data-parallel forms, the run.

Losses take unit-norm embeddings and the logit head's parameters. Under data parallelism each
device holds a slice of the global batch; `sharded_contrastive_loss` computes, with
`jax.shard_map` over the mesh's "data" axis, exactly the loss of the global batch on one device:
InfoNCE all-gathers the embeddings (every image is scored against every text), SigLIP passes
text chunks around a ring (Zhai et al. 2023, section 3.3), so no device holds all of them.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from models.clip import CLIP, CLIPConfig, tower_config
from parallel.mesh import make_mesh
from train import contrastive_data as cd
from train.checkpoint import Checkpointer
from train.metrics import MetricWriter, progress_bar
from train.optimizer import make_optimizer
from train.trainer import NonFiniteLossError, TrainResult

LOSSES = ("softmax", "sigmoid")

# ------------------------------------------------------------------------------------------------
# Losses. Shapes: image_embeds, text_embeds [B, E], unit norm; pair i is (image i, text i).


def softmax_loss(image_embeds, text_embeds, log_scale, bias=None) -> jax.Array:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021, Fig. 3): the mean of the image->text and
    text->image cross entropies of the [B, B] logits exp(log_scale) * I T^T (+ bias)."""
    logits = jnp.exp(log_scale) * image_embeds @ text_embeds.T
    if bias is not None:
        logits = logits + bias
    diag = jnp.diagonal(logits)
    image_ce = jax.nn.logsumexp(logits, axis=1) - diag
    text_ce = jax.nn.logsumexp(logits, axis=0) - diag
    return (image_ce.mean() + text_ce.mean()) / 2


def sigmoid_loss(image_embeds, text_embeds, log_scale, bias) -> jax.Array:
    """SigLIP (Zhai et al. 2023, Alg. 1): -sum log sigmoid(z_ij * logit_ij) / B over all B^2
    pairs, z = +1 on the diagonal and -1 elsewhere."""
    logits = jnp.exp(log_scale) * image_embeds @ text_embeds.T + bias
    signs = 2 * jnp.eye(logits.shape[0], dtype=logits.dtype) - 1
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0]


def contrastive_loss(kind: str, image_embeds, text_embeds, log_scale, bias=None) -> jax.Array:
    if kind == "softmax":
        return softmax_loss(image_embeds, text_embeds, log_scale, bias)
    if kind == "sigmoid":
        if bias is None:
            raise ValueError("the sigmoid loss needs a logit bias (set logit_bias_init)")
        return sigmoid_loss(image_embeds, text_embeds, log_scale, bias)
    raise ValueError(f"loss={kind!r} is not one of {LOSSES}")


def sharded_contrastive_loss(kind: str, mesh, axis: str = "data"):
    """The global-batch loss of `kind` from embeddings sharded over `axis` of `mesh`.

    Returns f(image_embeds [B, E], text_embeds [B, E], log_scale [], bias [] or None) -> [],
    equal to `contrastive_loss(kind, ...)` on the whole batch; B must divide by the axis size.
    """
    n = mesh.shape[axis]
    if kind not in LOSSES:
        raise ValueError(f"loss={kind!r} is not one of {LOSSES}")

    def softmax_local(image, text, log_scale, bias):
        b = image.shape[0]
        scale = jnp.exp(log_scale)
        all_images = jax.lax.all_gather(image, axis, tiled=True)  # [B, E]
        all_texts = jax.lax.all_gather(text, axis, tiled=True)
        own = jax.lax.axis_index(axis) * b + jnp.arange(b)  # this shard's pairs, globally
        image_logits = scale * image @ all_texts.T + bias  # [b, B]
        text_logits = scale * text @ all_images.T + bias
        positive = jnp.take_along_axis(image_logits, own[:, None], axis=1)[:, 0]
        total = jax.nn.logsumexp(image_logits, axis=1) - positive
        total = total + jax.nn.logsumexp(text_logits, axis=1) - positive
        return jax.lax.psum(total.sum(), axis) / (2 * b * n)

    def sigmoid_local(image, text, log_scale, bias):
        b = image.shape[0]
        scale = jnp.exp(log_scale)
        total = 0.0
        ring = [(j, (j + 1) % n) for j in range(n)]
        for hop in range(n):  # after `hop` passes, this device holds shard (i - hop) of texts
            logits = scale * image @ text.T + bias
            signs = 2 * jnp.eye(b, dtype=logits.dtype) - 1 if hop == 0 else -1.0
            total = total - jnp.sum(jax.nn.log_sigmoid(signs * logits))
            if hop < n - 1:
                text = jax.lax.ppermute(text, axis, ring)
        return jax.lax.psum(total, axis) / (b * n)

    local = softmax_local if kind == "softmax" else sigmoid_local
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(axis), P(), P()), out_specs=P())

    def loss(image_embeds, text_embeds, log_scale, bias=None):
        if kind == "sigmoid" and bias is None:
            raise ValueError("the sigmoid loss needs a logit bias (set logit_bias_init)")
        if image_embeds.shape[0] % n:
            raise ValueError(f"batch {image_embeds.shape[0]} is not divisible by {axis}={n}")
        bias = jnp.zeros((), jnp.float32) if bias is None else bias
        return mapped(image_embeds, text_embeds, log_scale, bias)

    return loss


# ------------------------------------------------------------------------------------------------
# Config.


def clip_config_from(config: ml_collections.ConfigDict, vocab_size: int) -> CLIPConfig:
    """The typed CLIPConfig of an experiment's `config.model` (see experiments/clip_digits.py)."""
    m = config.model
    if m.loss not in LOSSES:
        raise ValueError(f"model.loss={m.loss!r} is not one of {LOSSES}")
    tokens = (m.image_size // m.patch_size) ** 2 + (m.pooling == "cls")
    vision = tower_config(**m.vision.to_dict(), max_seq_len=tokens, causal=False, embed_norm=True)
    text = tower_config(**m.text.to_dict(), vocab_size=vocab_size, causal=True)
    return CLIPConfig(
        vision=vision,
        text=text,
        image_size=m.image_size,
        patch_size=m.patch_size,
        num_channels=m.num_channels,
        projection_dim=m.projection_dim,
        pooling=m.pooling,
        eos_token_id=cd.WordTokenizer.EOS,
        logit_scale_init=m.logit_scale_init,
        logit_bias_init=m.logit_bias_init if m.loss == "sigmoid" else None,
    )


# ------------------------------------------------------------------------------------------------
# The run.


def init_state(cfg: CLIPConfig, optimizer, seed: int) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, {"step", "params", "opt_state"}), initialised in one compiled program (eager
    initialisation would compile every parameter's initialiser on its own)."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0))))

    @jax.jit
    def init(key):
        params = nnx.to_pure_dict(nnx.state(CLIP(cfg, rngs=nnx.Rngs(params=key)), nnx.Param))
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": optimizer.init(params),
        }

    return graphdef, init(jax.random.key(seed))


def _embed_fns(graphdef):
    @jax.jit
    def images(params, x):
        model = nnx.merge(graphdef, params)
        return model.encode_image(x), model.vision.features(x)

    @jax.jit
    def texts(params, tokens):
        return nnx.merge(graphdef, params).encode_text(tokens)

    return images, texts


def evaluate(graphdef, params, data: cd.DigitsData, kind: str, probe: bool) -> dict[str, float]:
    """Held-out loss, zero-shot top-1 (prompt ensemble), retrieval R@1/5 and the linear probe."""
    embed_images, embed_texts = _embed_fns(graphdef)
    image_embeds, test_features = map(np.asarray, embed_images(params, data.test_images))
    text_embeds = np.asarray(embed_texts(params, data.tokenizer.encode(data.test_captions())))
    head = params["logit"]
    bias = head.get("bias") if kind == "sigmoid" else None
    loss = jax.jit(contrastive_loss, static_argnums=0)(
        kind, image_embeds, text_embeds, head["scale"], bias
    )
    classes = cd.class_text_embeddings(
        lambda t: embed_texts(params, t), data.tokenizer, cd.ZERO_SHOT_TEMPLATES
    )
    metrics = {
        "val_loss": float(loss),
        "zero_shot_top1": cd.zero_shot_accuracy(image_embeds, data.test_labels, classes),
        **cd.retrieval_recall(image_embeds, text_embeds, data.test_labels),
    }
    if probe:
        train_features = np.asarray(embed_images(params, data.train_images)[1])
        metrics["linear_probe_top1"] = cd.linear_probe_accuracy(
            train_features, data.train_labels, test_features, data.test_labels
        )
    return metrics


def make_train_step(graphdef, optimizer, loss_fn):
    """(state, batch) -> (state, metrics), jitted; a non-finite step leaves the state as it was."""

    def loss_of(params, batch):
        model = nnx.merge(graphdef, params)
        image_embeds, text_embeds = model(batch["images"], batch["tokens"])
        head = params["logit"]
        return loss_fn(image_embeds, text_embeds, head["scale"], head.get("bias"))

    def step_fn(state, batch):
        loss, grads = jax.value_and_grad(loss_of)(state["params"], batch)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = {
            "step": state["step"] + 1,
            "params": keep(params, state["params"]),
            "opt_state": keep(opt_state, state["opt_state"]),
        }
        scale = jnp.exp(state["params"]["logit"]["scale"])
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite, "scale": scale}

    return jax.jit(step_fn, donate_argnums=(0,))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> TrainResult:
    """Trains a CLIP/SigLIP model on the digits in `workdir`, resuming from its latest checkpoint.

    Writes metrics.jsonl (+ TensorBoard), checkpoints/, and results.json with the final
    held-out numbers (zero-shot and linear-probe top-1, retrieval recall@1/5).
    """
    start_time = time.time()
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tcfg, kind = config.train, config.model.loss
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    optimizer, schedule = make_optimizer(config.optimizer, tcfg.num_steps)
    data = cd.load_digits_split(
        config.model.image_size,
        config.data.test_fraction,
        config.data.seed,
        config.model.text.max_seq_len,
    )
    cfg = clip_config_from(config, data.tokenizer.vocab_size)
    mesh = make_mesh()  # all devices data parallel
    if config.data.batch_size % mesh.shape["data"]:
        raise ValueError(
            f"data.batch_size={config.data.batch_size} is not divisible by the "
            f"{mesh.shape['data']} devices"
        )
    graphdef, state = init_state(cfg, optimizer, tcfg.seed)
    checkpointer = Checkpointer(
        workdir / "checkpoints", keep=tcfg.keep_checkpoints, async_save=tcfg.async_checkpoint
    )
    start_step = 0
    if (latest := checkpointer.latest_step()) is not None:
        state, _, _ = checkpointer.restore(latest, state)
        start_step = int(state["step"])
        print(f"Resumed from step {start_step} ({workdir / 'checkpoints'})", flush=True)
    batch_sharding = NamedSharding(mesh, P("data"))
    train_step = make_train_step(graphdef, optimizer, sharded_contrastive_loss(kind, mesh))
    num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    print(
        f"CLIP ({kind} loss): {num_params / 1e6:.2f}M parameters; {len(data.train_labels)} train "
        f"/ {len(data.test_labels)} held-out digits on {mesh.shape['data']} device(s)",
        flush=True,
    )
    writer = MetricWriter(workdir, tensorboard=tcfg.tensorboard)
    bar = progress_bar(tcfg.num_steps, start_step, enabled=tcfg.progress_bar)
    metrics, eval_metrics, window = {}, {}, time.perf_counter()
    try:
        for step in range(start_step, tcfg.num_steps):
            batch = jax.device_put(data.train_batch(step, config.data.batch_size), batch_sharding)
            state, metrics = train_step(state, batch)
            done = step + 1
            is_last = done == tcfg.num_steps
            if done % tcfg.log_every == 0 or is_last:
                metrics = jax.device_get(metrics)
                if not metrics["finite"]:
                    raise NonFiniteLossError(
                        f"NaN or inf in the loss or gradient at step {done}; the last good "
                        f"checkpoint is step {checkpointer.latest_step()}"
                    )
                logged = {k: metrics[k] for k in ("loss", "grad_norm", "scale")}
                logged["learning_rate"] = schedule(step)
                logged["step_time_s"] = (time.perf_counter() - window) / tcfg.log_every
                writer.write(done, logged)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                window = time.perf_counter()
            if done % tcfg.eval_every == 0 or is_last:
                eval_metrics = evaluate(graphdef, state["params"], data, kind, probe=is_last)
                writer.write(done, eval_metrics)
                bar.write(
                    f"step {done}: loss {float(metrics['loss']):.4f}, held-out loss "
                    f"{eval_metrics['val_loss']:.4f}, zero-shot top-1 "
                    f"{eval_metrics['zero_shot_top1']:.3f} ({time.time() - start_time:.0f} s)"
                )
                window = time.perf_counter()
            if done % tcfg.checkpoint_every == 0 or is_last:
                checkpointer.save(done, state, {"step": done}, {"step": done, **eval_metrics})
            bar.update(1)
    finally:
        bar.close()
        checkpointer.close()
        writer.close()
    if not eval_metrics:  # resumed at the end: evaluate the restored model
        eval_metrics = evaluate(graphdef, state["params"], data, kind, probe=True)
    elapsed = time.time() - start_time
    (workdir / "results.json").write_text(
        json.dumps({**eval_metrics, "elapsed_s": elapsed}, indent=2)
    )
    print("Held-out: " + ", ".join(f"{k} {v:.3f}" for k, v in eval_metrics.items()), flush=True)
    return TrainResult(
        final_step=int(state["step"]),
        train_loss=float(metrics.get("loss", np.nan)),
        val_loss=eval_metrics["val_loss"],
        metrics_path=workdir / "metrics.jsonl",
        samples=[],
        elapsed_s=elapsed,
    )


def load_trained(workdir) -> tuple[CLIP, cd.WordTokenizer]:
    """Rebuilds the trained model (latest checkpoint) of a run directory, and its tokenizer."""
    workdir = pathlib.Path(workdir)
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    data = cd.load_digits_split(
        config.model.image_size,
        config.data.test_fraction,
        config.data.seed,
        config.model.text.max_seq_len,
    )
    cfg = clip_config_from(config, data.tokenizer.vocab_size)
    optimizer, _ = make_optimizer(config.optimizer, config.train.num_steps)
    graphdef, state = init_state(cfg, optimizer, 0)
    with Checkpointer(workdir / "checkpoints", read_only=True) as checkpointer:
        step = checkpointer.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
        state, _, _ = checkpointer.restore(step, state)
    return nnx.merge(graphdef, state["params"]), data.tokenizer
