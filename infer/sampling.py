"""Token sampling: the sampling rule, the trainer's sampler, and T5 / GLM blank filling.

`sample` continues a prompt with the KV-cached loop of `infer.decoding` when the text fits the
context, and slides a window over it otherwise.

This is the small, dependable path the trainer and notebooks use to print samples; each step
function is jitted once per (batch, length) shape and reused for every token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample_logits(
    logits: jax.Array,
    key: jax.Array,
    temperature: float | jax.Array,
    top_k: int | None = None,
    top_p: float | jax.Array = 1.0,
) -> jax.Array:
    """Draws one token per row from [B, V] logits.

    Args:
      logits: [B, V] scores.
      key: PRNG key.
      temperature: softmax temperature; a Python 0 is greedy (argmax, key unused). May be a
        traced scalar, so one compiled step serves every temperature.
      top_k: keep only the k highest-scoring tokens (None: all); static.
      top_p: nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely
        tokens whose probability adds up to at least top_p (1.0: all). May be traced.

    Returns:
      [B] int32 token ids.
    """
    if isinstance(temperature, (int, float)) and temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if not (isinstance(top_p, (int, float)) and top_p >= 1.0):
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        # A token stays if the tokens ranked above it hold less than top_p (so the top one
        # always stays); ties with the last kept score stay too. top_p >= 1 keeps everything,
        # whatever the rounding of the cumulative sum.
        kept = ((jnp.cumsum(probs, axis=-1) - probs) < top_p) | (top_p >= 1.0)
        threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "top_k"))
def _window_step(graphdef, state, window, length, key, temperature, top_k):
    model = nnx.merge(graphdef, state)
    logits = model(window)
    return sample_logits(logits[:, length - 1], key, temperature, top_k)


def sample(
    model: nnx.Module,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Continues `prompt` by `max_new_tokens` tokens; returns only the new tokens.

    Args:
      model: a `models.Decoder`.
      prompt: token ids (at least one).
      max_new_tokens: how many tokens to draw.
      temperature: softmax temperature; 0 means greedy.
      top_k: keep only the k most likely tokens before drawing.
      seed: PRNG seed: the same seed gives the same text.
    """
    if not prompt:
        raise ValueError("sample() needs a non-empty prompt (e.g. a newline or BOS token)")
    cfg = model.cfg
    if len(prompt) + max_new_tokens <= cfg.max_seq_len:
        from infer.decoding import stream_token_ids  # the KV-cached loop generation uses

        return list(
            stream_token_ids(
                model, prompt, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed
            )
        )
    graphdef, state = nnx.split(model)
    key = jax.random.key(seed)
    out: list[int] = []
    # The text outgrows the context: slide a fixed window (as nanoGPT's sampler crops).
    window_len = cfg.max_seq_len
    history = list(prompt)
    for _ in range(max_new_tokens):
        context = history[-window_len:]
        window = np.zeros((1, window_len), np.int32)
        window[0, : len(context)] = context
        key, sub = jax.random.split(key)
        next_token = _window_step(
            graphdef, state, jnp.asarray(window), len(context), sub, temperature, top_k
        )
        history.append(int(next_token[0]))
        out.append(history[-1])
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "length"))
def _fill_spans(graphdef, state, inputs, start_id, length):
    model = nnx.merge(graphdef, state)
    encoded = model.encode(inputs)
    batch = inputs.shape[0]
    cache = model.init_cache(batch, length)
    token = jnp.full((batch, 1), start_id, jnp.int32)

    def step(carry, _):
        token, cache = carry
        logits, cache = model.decode(token, encoded, cache=cache)
        token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
        return (token, cache), token[:, 0]

    _, tokens = jax.lax.scan(step, (token, cache), None, length=length)
    return tokens.T


def fill_spans(model: nnx.Module, inputs, start_id: int, length: int) -> np.ndarray:
    """Greedy T5 decoding of `length` target tokens for corrupted inputs [B, S] -> [B, length].

    The encoder runs once; the decoder runs one cached step per token inside one jitted scan.
    """
    graphdef, state = nnx.split(model)
    tokens = _fill_spans(graphdef, state, jnp.asarray(inputs, jnp.int32), start_id, length)
    return np.asarray(tokens)[0] if np.ndim(inputs) == 1 else np.asarray(tokens)


def fill_blank(
    model: nnx.Module, context, mask_index: int, start_id: int, end_id: int, max_tokens: int
) -> list[int]:
    """Greedy GLM blank filling: the tokens the model writes for the [MASK] at mask_index.

    The context (part A, [MASK]s included) attends to itself both ways; the span is generated
    after [S] with 2D positions (mask_index, 1..), until [E] or max_tokens.
    """
    context = [int(t) for t in context]
    n = len(context)
    cache = model.init_cache(1, n + 1 + max_tokens)
    tokens = jnp.asarray([context + [start_id]], jnp.int32)
    positions = jnp.asarray([list(range(n)) + [mask_index]], jnp.int32)
    blocks = jnp.asarray([[0] * n + [1]], jnp.int32)
    graphdef, state = nnx.split(model)

    def step(*args):
        return _glm_step(graphdef, state, *args)

    out: list[int] = []
    next_token, cache = step(tokens, positions, blocks, cache, jnp.asarray([n], jnp.int32))
    for k in range(max_tokens):
        token = int(next_token[0])
        if token == end_id:
            break
        out.append(token)
        next_token, cache = step(
            jnp.asarray([[token]], jnp.int32),
            jnp.asarray([[mask_index]], jnp.int32),
            jnp.asarray([[k + 2]], jnp.int32),
            cache,
            jnp.asarray([n], jnp.int32),
        )
    return out


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _glm_step(graphdef, state, tokens, positions, blocks, cache, prefix_len):
    """One greedy GLM step; compiled once per (prompt length, cache length) shape."""
    logits, cache = nnx.merge(graphdef, state)(
        tokens, positions=positions, cache=cache, block_positions=blocks, prefix_len=prefix_len
    )
    return jnp.argmax(logits[:, -1], axis=-1), cache
