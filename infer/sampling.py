"""Token sampling: the sampling rule, the trainer's sampler, and T5 / GLM blank filling.

`sample` continues a prompt with the KV-cached loop of `infer.decoding` when the text fits the
context, and slides a window over it otherwise.

This is the small, dependable path the trainer and notebooks use to print samples; each step
function is jitted once per (batch, length) shape and reused for every token.
"""

from __future__ import annotations

import dataclasses
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


# At most this many top_logprobs per token (OpenAI's limit).
MAX_TOP_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings, as the batching engine applies them per row.

    temperature 0 is greedy. top_k 0, top_p 1, min_p 0 and neutral penalties disable those
    filters. Penalties: repetition (CTRL, Keskar et al. 2019; > 1 discourages every token seen
    in the prompt or output), presence and frequency (OpenAI's: subtract presence * [count > 0]
    + frequency * count over the output). logit_bias adds to chosen tokens' logits. seed: the
    same seed gives the same tokens, whatever else shares the batch. logprobs: None, or how
    many top_logprobs (0..20) to return beside each sampled token's own log-probability.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int = 0
    logprobs: int | None = None

    def check(self, vocab_size: int) -> None:
        """Raises ValueError naming the first out-of-range setting."""
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0 (0 disables it)"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
                f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}, got {self}")
        for token, bias in self.logit_bias:
            if not 0 <= token < vocab_size or not -100 <= bias <= 100:
                raise ValueError(
                    f"logit_bias needs token ids in [0, {vocab_size}) and biases in [-100, "
                    f"100], got {token}: {bias}"
                )

    def row(self) -> tuple[float, ...]:
        """The traced per-row values, in the order of `ROW_FIELDS` (logprobs None is -1)."""
        values = {**vars(self), "logprobs": -1 if self.logprobs is None else self.logprobs}
        return tuple(float(values[f]) for f in ROW_FIELDS)


ROW_FIELDS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
)


def seed_key_data(seed: int) -> np.ndarray:
    """The raw uint32 key of a seed (any int64), for per-row keys inside a jitted step."""
    return np.asarray(jax.random.key_data(jax.random.key(seed)), np.uint32)


def sample_rows(
    logits: jax.Array,
    rows: jax.Array,
    key_data: jax.Array,
    steps: jax.Array,
    counts: jax.Array,
    seen: jax.Array,
    bias: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Samples one token per row, each row with its own settings (one compiled step for all).

    Args:
      logits: [B, V] model scores.
      rows: [B, len(ROW_FIELDS)] float32 settings (see `SamplingParams.row`).
      key_data: [B, 2] uint32 seed keys; steps: [B] int32 index of the token being drawn (the
        key is fold_in(seed key, step), so a row's draws do not depend on its neighbours).
      counts: [B, V] int32 output-token counts; seen: [B, V] bool prompt-or-output tokens.
      bias: [B, V] float32 logit_bias.

    Returns:
      (tokens [B] int32, their log-probabilities [B], top ids [B, 20], top log-probs [B, 20]),
      log-probabilities under the model's distribution (before any setting); the top ones are
      computed only when some row asks for logprobs (zeros otherwise).

    What no row needs is skipped at run time (`lax.cond`): the penalties, and for an all-greedy
    batch the temperature, filters and random draw (a random number per vocabulary entry), and
    the top-20. At B=64 and V=49152 these cost more than the model's decode step on a CPU.
    """
    temperature, top_k, top_p, min_p, repetition, presence, frequency, want_top = rows.T
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1, keepdims=True)

    def penalize(x):
        rep = repetition[:, None]
        x = jnp.where(seen, jnp.where(x > 0, x / rep, x * rep), x)
        return x - presence[:, None] * (counts > 0) - frequency[:, None] * counts + bias

    needs_penalty = jnp.any(repetition != 1) | jnp.any(presence != 0) | jnp.any(frequency != 0)
    x = jax.lax.cond(needs_penalty | jnp.any(bias != 0), penalize, lambda x: x, logits)
    greedy = jax.lax.top_k(x, 1)[1][:, 0].astype(jnp.int32)  # = argmax (lowest index on ties)

    def sort_filters(x):
        # top-k and nucleus (Holtzman et al. 2020) thresholds from one descending sort.
        ordered = jnp.sort(x, axis=-1)[:, ::-1]
        k = jnp.clip(top_k.astype(jnp.int32), 0, x.shape[-1])
        kth = jnp.take_along_axis(ordered, jnp.maximum(k - 1, 0)[:, None], axis=-1)
        x = jnp.where((k[:, None] > 0) & (x < kth), -jnp.inf, x)
        ordered = jnp.where((k[:, None] > 0) & (ordered < kth), -jnp.inf, ordered)
        probs = jax.nn.softmax(ordered, axis=-1)
        kept = ((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]) | (top_p[:, None] >= 1)
        threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(x < threshold, -jnp.inf, x)

    def draw(x):
        x = x / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        x = jax.lax.cond(jnp.any((top_k > 0) | (top_p < 1)), sort_filters, lambda x: x, x)
        # min-p (Nguyen et al. 2024): drop tokens below min_p times the top token's probability.
        probs = jax.nn.softmax(x, axis=-1)
        x = jnp.where(probs < min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True), -jnp.inf, x)
        keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(key_data), steps)
        drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, x)
        return jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy)

    tokens = jax.lax.cond(jnp.any(temperature > 0), draw, lambda x: greedy, x)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - log_z[:, 0]
    k = min(MAX_TOP_LOGPROBS, logits.shape[-1])

    def top(logits):
        top_logits, top_ids = jax.lax.top_k(logits, k)
        return top_ids.astype(jnp.int32), top_logits - log_z

    def no_top(logits):
        return jnp.zeros((logits.shape[0], k), jnp.int32), jnp.zeros((logits.shape[0], k))

    top_ids, top_lp = jax.lax.cond(jnp.any(want_top > 0), top, no_top, logits)
    return tokens, chosen, top_ids, top_lp


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


@functools.partial(jax.jit, static_argnames=("graphdef", "length", "greedy", "top_k"))
def _seq2seq(graphdef, state, inputs, start_id, length, key, greedy, temperature, top_k, top_p):
    model = nnx.merge(graphdef, state)
    encoded = model.encode(inputs)
    batch = inputs.shape[0]
    cache = model.init_cache(batch, length)
    token = jnp.full((batch, 1), start_id, jnp.int32)

    def step(carry, i):
        token, cache = carry
        logits, cache = model.decode(token, encoded, cache=cache)
        t = 0.0 if greedy else temperature  # the same rule as the decoder-only paths
        token = sample_logits(logits[:, -1], jax.random.fold_in(key, i), t, top_k, top_p)
        return (token[:, None], cache), token

    _, tokens = jax.lax.scan(step, (token, cache), jnp.arange(length))
    return tokens.T


def generate_seq2seq(
    model: nnx.Module,
    inputs,
    max_tokens: int,
    start_id: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """Decodes `max_tokens` target tokens for encoder inputs [B, S] (or [S]) -> [B, max_tokens].

    An encoder-decoder model (T5): the encoder runs once; the decoder runs one cached step per
    token inside one jitted scan, each drawn by `sample_logits` (greedy at temperature 0), the
    rule the decoder-only paths use. Temperature and top_p are traced: new values reuse the
    compilation.
    """
    graphdef, state = nnx.split(model)
    tokens = _seq2seq(
        graphdef, state, jnp.atleast_2d(jnp.asarray(inputs, jnp.int32)), start_id, max_tokens,
        jax.random.key(seed), temperature == 0, jnp.float32(temperature), top_k,
        jnp.float32(top_p),
    )  # fmt: skip
    return np.asarray(tokens)[0] if np.ndim(inputs) == 1 else np.asarray(tokens)


def fill_spans(model: nnx.Module, inputs, start_id: int, length: int) -> np.ndarray:
    """Greedy T5 decoding of `length` target tokens for corrupted inputs [B, S] -> [B, length]."""
    return generate_seq2seq(model, inputs, length, start_id)


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
