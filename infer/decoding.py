"""Text generation from a pretrained model: a jitted, KV-cached decode loop.

`generate(lm, prompt)` continues a string as raw text and answers a list of chat messages
through the model's chat template (`python -m infer.generate` is its CLI). The prompt is prefilled in one call (padded to a length bucket, so few shapes compile),
then one jitted step per new token writes its keys and values into the cache; both reuse
their compilation across calls with the same buckets. This is the simple single-sequence path;
the batching engine is `infer.engine`'s job.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infer.sampling import sample_logits

Messages = list[dict[str, Any]]

# Prompts are padded to a multiple of this, caches to a multiple of CACHE_BUCKET.
PROMPT_BUCKET = 64
CACHE_BUCKET = 256


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# Sampling settings are traced values (one compilation serves every temperature and top_p);
# only greedy-or-not and top_k (a shape) are static.
@functools.partial(
    jax.jit, static_argnames=("graphdef", "greedy", "top_k"), donate_argnames=("cache",)
)
def _prefill(graphdef, state, tokens, length, cache, key, greedy, temperature, top_k, top_p):
    """Runs the padded prompt [1, P] through the model; samples the token after `length`."""
    model = nnx.merge(graphdef, state)
    logits, cache = model(tokens, cache=cache, logits_positions=jnp.reshape(length - 1, (1,)))
    # Slots past the real prompt hold padding's keys: move the cursor back so they are masked
    # and then overwritten.
    cache = cache._replace(index=jnp.full_like(cache.index, length))
    return _sample(logits[:, 0], key, greedy, temperature, top_k, top_p), cache


@functools.partial(
    jax.jit, static_argnames=("graphdef", "greedy", "top_k"), donate_argnames=("cache",)
)
def _decode_step(graphdef, state, token, cache, key, greedy, temperature, top_k, top_p):
    """Feeds one token [1] and samples the next one."""
    model = nnx.merge(graphdef, state)
    logits, cache = model(token[:, None], cache=cache)
    return _sample(logits[:, -1], key, greedy, temperature, top_k, top_p), cache


def _sample(logits, key, greedy, temperature, top_k, top_p):
    if greedy:
        return sample_logits(logits, key, 0.0)
    return sample_logits(logits, key, temperature, top_k, top_p)


def stream_token_ids(
    model: nnx.Module,
    prompt_ids: Sequence[int],
    max_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    stop_ids: frozenset[int] = frozenset(),
) -> Iterator[int]:
    """Yields new token ids one at a time, until max_tokens or a stop id (not yielded).

    Args:
      model: a `models.Decoder`.
      prompt_ids: the prompt, at least one token.
      max_tokens: most new tokens; lowered so prompt + new tokens fit cfg.max_seq_len.
      temperature, top_p, top_k: sampling (temperature 0 is greedy).
      seed: PRNG seed; the same seed and inputs give the same tokens.
      stop_ids: ids that end the generation.

    Raises:
      ValueError: an empty prompt, or one that fills the whole context.
    """
    cfg = model.cfg
    n = len(prompt_ids)
    if n == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if n >= cfg.max_seq_len:
        raise ValueError(f"the prompt has {n} tokens; the model's context is {cfg.max_seq_len}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    max_tokens = min(max_tokens, cfg.max_seq_len - n)
    if max_tokens <= 0:
        return
    graphdef, state = nnx.split(model)  # per request; the jitted steps take state as input
    padded = min(_round_up(n, PROMPT_BUCKET), cfg.max_seq_len)
    cache_len = min(_round_up(max(n + max_tokens, padded), CACHE_BUCKET), cfg.max_seq_len)
    tokens = np.zeros((1, padded), np.int32)
    tokens[0, :n] = prompt_ids
    cache = model.init_cache(1, cache_len)
    sampling = dict(
        greedy=temperature == 0,
        temperature=jnp.float32(temperature),
        top_k=top_k,
        top_p=jnp.float32(top_p),
    )
    key = jax.random.key(seed)
    key, sub = jax.random.split(key)
    token, cache = _prefill(graphdef, state, jnp.asarray(tokens), n, cache, sub, **sampling)
    for i in range(max_tokens):
        token_id = int(token[0])
        if token_id in stop_ids:
            return
        yield token_id
        if i + 1 == max_tokens:
            return
        key, sub = jax.random.split(key)
        token, cache = _decode_step(graphdef, state, token, cache, sub, **sampling)


def prompt_ids(lm, prompt: str | Messages, *, raw: bool = False) -> list[int]:
    """Token ids for a prompt: a string as raw text, a list of messages via the chat template.

    With raw=False a string prompt of a model that has a chat template is sent as one user
    message, as `python -m infer.generate` does; `generate()` itself treats strings as raw.
    Messages ending with an assistant message are rendered so that the model continues it
    (a prefilled start of the reply), as transformers' pipelines do.
    """
    tokenizer = lm.tokenizer
    if isinstance(prompt, str):
        if raw or tokenizer.chat_template is None:
            return tokenizer.encode(prompt, add_special_tokens=True)
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list):
        raise TypeError(f"prompt must be a string or a list of messages, got {type(prompt)}")
    if prompt and prompt[-1].get("role") == "assistant":  # continue a prefilled reply
        return tokenizer.apply_chat_template(
            prompt, add_generation_prompt=False, continue_final_message=True
        )
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True)


def generate_stream(
    lm,
    prompt: str | Messages,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    *,
    top_k: int | None = None,
) -> Iterator[str]:
    """Yields the completion as text pieces as they are decoded (see `generate`)."""
    ids = prompt_ids(lm, prompt, raw=isinstance(prompt, str))
    decoder = lm.tokenizer.stream_decoder()
    stream = stream_token_ids(
        lm.model,
        ids,
        max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop_ids=lm.tokenizer.stop_ids,
    )
    for token_id in stream:
        if piece := decoder.push(token_id):
            yield piece
    if rest := decoder.flush():
        yield rest


def generate(
    lm,
    prompt: str | Messages,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    *,
    top_k: int | None = None,
) -> str:
    """Completes a prompt with a pretrained model (`models.load_pretrained`).

    Args:
      lm: a loaded language model (model + tokenizer).
      prompt: a string, continued as raw text; or a list of chat messages
        ({"role": ..., "content": ...}), rendered with the model's chat template and answered.
      max_tokens: most new tokens (fewer if an end-of-turn/end-of-text token comes first).
      temperature: 0 is greedy; higher is more random.
      top_p: nucleus sampling threshold (1.0 disables it).
      seed: PRNG seed: the same seed gives the same text.
      top_k: keep only the k most likely tokens (None disables it).

    Returns:
      The generated text, without the prompt.
    """
    return "".join(generate_stream(lm, prompt, max_tokens, temperature, top_p, seed, top_k=top_k))


# ------------------------------------------------------------------------------------------------
# Shared by the CLIs (infer.generate, infer.chat).


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="a registry name, a .gguf file, or a Hugging Face checkpoint dir",
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)


def load_model_or_exit(args: argparse.Namespace):
    """load_pretrained for a CLI: a bad name, path or file ends the program with one line."""
    from models import load_pretrained
    from models.gguf import GGUFError
    from models.hub import PackageChecksumError, PackageUnavailable

    try:
        overrides = {}
        if getattr(args, "max_seq_len", None):
            overrides["max_seq_len"] = args.max_seq_len
        return load_pretrained(args.model, dtype=args.dtype, **overrides)
    except (ValueError, GGUFError, PackageUnavailable, PackageChecksumError, OSError) as e:
        print(f"error: cannot load {args.model!r}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
