"""The continuous-batching engine: a scheduler thread over a paged KV cache.

Requests wait in a queue; at every iteration the scheduler admits as many as there are free
batch slots and KV blocks for their prompts, runs one prefill call (a chunk of up to
prefill_batch waiting prompts, rows and length padded to powers of two) and one decode step for
every decoding sequence (their rows padded to a power of two, at most max_batch), and hands
each new token to its request's callback. A sequence that
finishes or is cancelled frees its slot and blocks at once. Blocks are allocated as sequences
grow; when none is left the most recently admitted sequence is preempted (its blocks freed, its
tokens recomputed when it is admitted again). One jitted program per (rows, length, table
width) bucket, compiled once: no compilation per request or token.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infer.kv_cache import BlockAllocator, CacheSpec, block_hashes, with_rows
from infer.metrics import EngineMetrics
from infer.sampling import ROW_FIELDS, SamplingParams, sample_rows, seed_key_data
from models.layers import PagedKVCache

log = logging.getLogger(__name__)
# Events a request's callback receives, from the engine thread:
#   ("token", id, logprob, [(id, logprob), ...] top_logprobs or None)
#   ("finish", reason, completion_tokens)   reason: "stop" | "length" | "cancelled"
#   ("error", message)                      the request is over
Event = tuple


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Sizes of the engine. num_blocks None: room for max_batch sequences of full context."""

    max_batch: int = 8
    block_size: int = 16
    num_blocks: int | None = None
    kv_dtype: str = "float32"  # or "int8"
    max_queue: int = 64
    prefill_chunk: int = 256  # most prompt tokens of one request per prefill call
    prefill_batch: int = 8  # most requests prefilled together in one call
    prefix_cache: bool = True


class QueueFull(Exception):
    """The waiting queue holds max_queue requests already."""


@dataclasses.dataclass(eq=False)
class Request:
    """One sequence to generate; `on_event` gets its events (see `Event`)."""

    prompt: list[int]
    max_tokens: int
    params: SamplingParams = SamplingParams(temperature=0.0)
    stop_ids: frozenset[int] = frozenset()
    on_event: Callable[[Event], None] = lambda event: None
    output: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    # Scheduler state, owned by the engine thread.
    order: int = 0
    slot: int | None = None
    table: list[int] = dataclasses.field(default_factory=list)
    cached: int = 0  # tokens whose keys and values are in the cache
    hashes: list[bytes] = dataclasses.field(default_factory=list)
    cancelled: bool = False
    submitted: float = 0.0
    last_token: float | None = None
    row: tuple[float, ...] | None = None  # params.row() and the seed's key, cached
    key_data: np.ndarray | None = None

    def context(self) -> list[int]:
        """The tokens to hold in the cache: the prompt and all output but the newest token."""
        return self.prompt + self.output[:-1]


@functools.partial(
    jax.jit, static_argnames=("graphdef",), donate_argnames=("pages", "counts", "seen")
)
def _forward(graphdef, state, pages, tokens, tables, lengths, num_new, logit_index, slots,
             update, rows, key_data, steps, counts, seen, bias):  # fmt: skip
    """Runs tokens [B, T] of rows `slots` through the model into the paged cache; samples.

    Prefill is B prompts (a power of two) with T a bucket; decode is B a power of two with T=1.
    `slots` [B] are the rows' engine slots (their penalty state in counts, seen and bias);
    `update` [B] marks the rows whose sampled token counts for the penalties (padding rows use
    the spare last slot).
    """
    model = nnx.merge(graphdef, state)
    cache = with_rows(PagedKVCache(*pages[:2], None, None, None, *pages[2:]), tables, lengths,
                      num_new)  # fmt: skip
    positions = lengths[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    logits, cache = model(tokens, positions=positions, cache=cache, logits_positions=logit_index)
    tok, lp, top_ids, top_lp = sample_rows(
        logits[:, 0], rows, key_data, steps, counts[slots], seen[slots], bias[slots]
    )
    counts = counts.at[slots, tok].add(update.astype(jnp.int32))
    seen = seen.at[slots, tok].set(seen[slots, tok] | update)
    pages = (cache.key, cache.value, cache.key_scale, cache.value_scale)
    return tok, lp, top_ids, top_lp, pages, counts, seen


@functools.partial(jax.jit, donate_argnums=(0, 1, 2))
def _set_row(counts, seen, bias, slot, counts_row, seen_row, bias_row):
    return counts.at[slot].set(counts_row), seen.at[slot].set(seen_row), bias.at[slot].set(bias_row)


class Engine:
    """Continuous batching of a `models.Decoder` over a paged KV cache, on its own thread.

    Args:
      model: the decoder (its cfg.max_seq_len is the context).
      config: sizes (EngineConfig).

    Raises:
      ValueError: a cache that cannot hold one sequence of the whole context.
    """

    def __init__(self, model: nnx.Module, config: EngineConfig = EngineConfig()):
        cfg = self.model_cfg = model.cfg
        self.config = config
        bs = config.block_size
        per_seq = -(-cfg.max_seq_len // bs)
        num_blocks = config.num_blocks or config.max_batch * per_seq + 1
        self.spec = CacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, num_blocks, bs,
                              cfg.max_seq_len, config.kv_dtype)  # fmt: skip
        self.spec.check()
        self.allocator = BlockAllocator(num_blocks, bs)
        self.graphdef, self.state = nnx.split(model)
        cache = self.spec.init()
        self.pages = (cache.key, cache.value, cache.key_scale, cache.value_scale)
        s, v = config.max_batch, cfg.vocab_size
        # Per-slot penalty state; row s is scratch for the padding rows of a decode batch.
        self.counts = jnp.zeros((s + 1, v), jnp.int32)
        self.seen = jnp.zeros((s + 1, v), bool)
        self.bias = jnp.zeros((s + 1, v), jnp.float32)
        self.slots: list[Request | None] = [None] * s
        self.waiting: collections.deque[Request] = collections.deque()
        self.cancelled = 0  # requests that ended by cancel()
        self.steps = 0  # decode steps run
        self.prefill_calls = 0
        self.metrics = EngineMetrics(self.stats)
        self._orders = iter(range(1 << 62))
        self._cond = threading.Condition()
        self._closed = self._paused = False
        self._thread = threading.Thread(target=self._run, name="jaxlm-engine", daemon=True)
        self._thread.start()

    # -- the client side (any thread) ------------------------------------------------------------

    def capacity(self) -> dict[str, int]:
        return {**self.spec.capacity(), "max_batch": self.config.max_batch}

    def stats(self) -> dict[str, int]:
        return {
            "waiting": len(self.waiting),
            "running": sum(r is not None for r in self.slots),
            "blocks_used": self.allocator.used,
            "blocks_total": self.allocator.capacity,
            "cancelled": self.cancelled,
        }

    def check(self, request: Request) -> None:
        """Raises ValueError for a request that is invalid or can never fit the cache."""
        n, context = len(request.prompt), self.model_cfg.max_seq_len
        if n == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if n >= context:
            raise ValueError(f"the prompt has {n} tokens; the model's context is {context}")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if max(request.prompt) >= self.model_cfg.vocab_size or min(request.prompt) < 0:
            raise ValueError(f"prompt token ids must be in [0, {self.model_cfg.vocab_size})")
        request.params.check(self.model_cfg.vocab_size)
        total = min(n + request.max_tokens, context)
        if self.allocator.blocks_for(total) > self.allocator.capacity:
            raise ValueError(
                f"the request needs {total} tokens of KV cache and the whole cache holds "
                f"{self.allocator.capacity * self.config.block_size}: it can never fit"
            )

    def submit(self, *requests: Request) -> None:
        """Queues requests, all or none (n choices of one API call).

        Raises:
          ValueError: a request that is invalid or can never fit (see `check`).
          QueueFull: the queue has no room for all of them.
        """
        for request in requests:
            self.check(request)
        with self._cond:
            if len(self.waiting) + len(requests) > self.config.max_queue:
                raise QueueFull(
                    f"{len(self.waiting)} requests are already waiting "
                    f"(max_queue={self.config.max_queue})"
                )
            for request in requests:
                request.order, request.submitted = next(self._orders), time.perf_counter()
                self.waiting.append(request)
            self._cond.notify()

    def cancel(self, request: Request) -> None:
        """Stops a request; its slot and blocks are freed before the next step."""
        with self._cond:
            if request.finish_reason is None:
                request.cancelled = True
                self._cond.notify()

    def generate(self, requests: Sequence[Request], timeout: float = 600) -> list[list[int]]:
        """Submits requests, waits for them all; returns their output tokens (tests, benchmark)."""
        done = threading.Semaphore(0)
        for request in requests:
            user = request.on_event

            def on_event(event, user=user):
                user(event)
                if event[0] in ("finish", "error"):
                    done.release()

            request.on_event = on_event
        self.submit(*requests)
        for _ in requests:
            if not done.acquire(timeout=timeout):
                raise TimeoutError(f"requests unfinished after {timeout}s")
        return [r.output for r in requests]

    def pause(self) -> None:
        """Holds the scheduler after its current step (tests fill the queue this way)."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # -- the engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (self._paused or not self._busy()):
                    self._cond.wait()
                if self._closed:
                    return
                self._reap_cancelled()
            try:
                self._admit()
                self._step()
            except Exception as e:  # fail the running requests; the engine lives on
                log.exception("engine step failed")
                for request in [r for r in self.slots if r is not None]:
                    self._finish(request, None, error=f"{type(e).__name__}: {e}")

    def _busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots)

    def _reap_cancelled(self) -> None:
        for request in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(request)
            self._finish(request, "cancelled")
        for request in self.slots:
            if request is not None and request.cancelled:
                self._finish(request, "cancelled")

    def _admit(self) -> None:
        while self.waiting and None in self.slots:
            with self._cond:
                request = self.waiting[0]
            context = request.context()
            hashes = []
            if self.config.prefix_cache:  # the last token is always computed: it gives logits
                hashes = block_hashes(context[:-1], self.config.block_size)
            if not self.allocator.can_allocate(len(context), hashes):
                return  # first come, first served: the head waits for blocks
            with self._cond:
                self.waiting.popleft()
            request.table, hit = self.allocator.allocate(len(context), hashes)
            request.hashes, request.cached = hashes, hit * self.config.block_size
            request.slot = self.slots.index(None)
            self.slots[request.slot] = request
            self._reset_row(request)
            self.metrics.prompt_tokens.inc(len(request.prompt))
            self.metrics.prefix_hit_tokens.inc(request.cached)

    def _reset_row(self, request: Request) -> None:
        v = self.model_cfg.vocab_size
        counts = np.bincount(np.asarray(request.output, np.int64), minlength=v).astype(np.int32)
        seen = np.zeros(v, bool)
        seen[request.prompt] = True
        seen[request.output] = True
        bias = np.zeros(v, np.float32)
        for token, value in request.params.logit_bias:
            bias[token] = value
        self.counts, self.seen, self.bias = _set_row(
            self.counts, self.seen, self.bias, request.slot, counts, seen, bias
        )

    def _step(self) -> None:
        running = sorted((r for r in self.slots if r is not None), key=lambda r: r.order)
        prefilling = [r for r in running if r.cached < len(r.context())]
        if prefilling:
            self._prefill(prefilling)
        decoding = []
        for r in running:
            ready = r.slot is not None and r.finish_reason is None and r.output
            if ready and r.cached == len(r.context()) and self._grow(r):
                decoding.append(r)
        decoding = [r for r in decoding if r.slot is not None]  # none preempted after growing
        if decoding:
            self._decode(decoding)

    def _grow(self, request: Request) -> bool:
        """Gives request a block for its next token, preempting the newest if none is free."""
        bs = self.config.block_size
        while len(request.table) * bs < request.cached + 1:
            if self.allocator.free:
                self.allocator.grow(request.table, 1)
                continue
            victim = max((r for r in self.slots if r is not None), key=lambda r: r.order)
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.allocator.release(request.table)
        self.slots[request.slot] = None
        request.table, request.cached, request.slot = [], 0, None
        with self._cond:
            self.waiting.appendleft(request)
        self.metrics.preemptions.inc()

    def _table_width(self, requests: Sequence[Request]) -> int:
        """Block-table columns for a call: a power of two covering the longest table.

        Attention reads every column, so short sequences should not pay for the whole context;
        a few widths compile (log2 of the context in blocks), never one per request.
        """
        longest = max(len(r.table) for r in requests)
        return min(max(4, 1 << (longest - 1).bit_length()), self.spec.max_blocks_per_seq)

    def _rows(self, requests: Sequence[Request], size: int, width: int):
        """Per-row settings, seed keys and block tables for `requests` in rows 0.. of `size`."""
        rows = np.zeros((size, len(ROW_FIELDS)), np.float32)
        rows[:, ROW_FIELDS.index("top_p")] = 1.0
        rows[:, ROW_FIELDS.index("repetition_penalty")] = 1.0
        keys = np.zeros((size, 2), np.uint32)
        tables = np.zeros((size, width), np.int32)
        for i, r in enumerate(requests):
            if r.row is None:  # computed once per request: a jax.random.key call per step
                r.row, r.key_data = r.params.row(), seed_key_data(r.params.seed)  # is ~0.1 ms
            rows[i], keys[i] = r.row, r.key_data
            tables[i, : len(r.table)] = r.table
        return rows, keys, tables

    def _call(self, tokens, tables, lengths, num_new, logit_index, slots, update, rows, keys,
              steps):  # fmt: skip
        out = _forward(
            self.graphdef, self.state, self.pages, tokens, tables, lengths, num_new, logit_index,
            slots, update, rows, keys, steps, self.counts, self.seen, self.bias,
        )  # fmt: skip
        tok, lp, top_ids, top_lp, self.pages, self.counts, self.seen = out
        return jax.device_get((tok, lp, top_ids, top_lp))

    def _prefill(self, requests: list[Request]) -> None:
        """One chunk of each of the oldest prefilling requests, in one call.

        The chunk length T is the first request's (its remaining prompt, at most prefill_chunk,
        padded to a power of two); the next ones join while they are fewer than prefill_batch,
        each with min(its remaining tokens, T). Rows are padded to a power of two.
        """
        t = min(_bucket(len(requests[0].context()) - requests[0].cached),
                self.config.prefill_chunk, self.model_cfg.max_seq_len)  # fmt: skip
        batch = requests[: self.config.prefill_batch]
        size = _bucket(len(batch), low=1)
        rows, keys, tables = self._rows(batch, size, self._table_width(batch))
        tokens, lengths = np.zeros((size, t), np.int32), np.zeros(size, np.int32)
        num_new, slots = np.zeros(size, np.int32), np.full(size, self.config.max_batch, np.int32)
        sample = np.zeros(size, bool)
        for i, r in enumerate(batch):
            context, start = r.context(), r.cached
            num = min(len(context) - start, t)
            tokens[i, :num] = context[start : start + num]
            lengths[i], num_new[i], slots[i] = start, num, r.slot
            # The last chunk gives the first token; a preempted request already has its token.
            sample[i] = start + num == len(context) and not r.output
        tok, lp, top_ids, top_lp = self._call(
            tokens, tables, lengths, num_new, np.maximum(num_new - 1, 0), slots, sample, rows,
            keys, np.zeros(size, np.int32),
        )  # fmt: skip
        self.prefill_calls += 1
        for i, r in enumerate(batch):
            r.cached += int(num_new[i])
            if r.cached == len(r.context()):
                self.allocator.register(r.table, r.hashes)
            if sample[i]:
                self._accept(r, int(tok[i]), lp[i], top_ids[i], top_lp[i])

    def _decode(self, requests: list[Request]) -> None:
        """One token for each request: rows in slot order, padded to a power of two so a few
        batch sizes compile and a light load does not pay for max_batch rows."""
        active = sorted(requests, key=lambda r: r.slot)
        n, spare = len(active), self.config.max_batch
        size = min(_bucket(n, low=1), self.config.max_batch)
        rows, keys, tables = self._rows(active, size, self._table_width(active))
        tokens, lengths, steps = (np.zeros((size, 1), np.int32), np.zeros(size, np.int32),
                                  np.zeros(size, np.int32))  # fmt: skip
        slots = np.full(size, spare, np.int32)
        update = np.arange(size) < n
        for i, r in enumerate(active):
            tokens[i, 0], lengths[i], steps[i], slots[i] = (
                r.output[-1],
                r.cached,
                len(r.output),
                r.slot,
            )
        tok, lp, top_ids, top_lp = self._call(
            tokens, tables, lengths, update.astype(np.int32), np.zeros(size, np.int32),
            slots, update, rows, keys, steps,
        )  # fmt: skip
        self.steps += 1
        for i, r in enumerate(active):  # the API's ordering of choices does not depend on this
            r.cached += 1
            self._accept(r, int(tok[i]), lp[i], top_ids[i], top_lp[i])

    def _accept(self, request: Request, token: int, lp, top_ids, top_lp) -> None:
        now = time.perf_counter()
        if request.last_token is None:
            self.metrics.ttft.observe(now - request.submitted)
        else:
            self.metrics.per_token.observe(now - request.last_token)
        request.last_token = now
        if token in request.stop_ids:
            self._finish(request, "stop")
            return
        request.output.append(token)
        self.metrics.generated_tokens.inc()
        top = None
        if (k := request.params.logprobs) is not None:
            top = [(int(i), float(v)) for i, v in zip(top_ids[:k], top_lp[:k], strict=True)]
        self._emit(request, ("token", token, float(lp), top))
        full = len(request.prompt) + len(request.output) >= self.model_cfg.max_seq_len
        if len(request.output) >= request.max_tokens or full:
            self._finish(request, "length")

    def _finish(self, request: Request, reason: str | None, error: str | None = None) -> None:
        if request.slot is not None:
            self.allocator.release(request.table)
            self.slots[request.slot] = None
            request.table, request.slot = [], None
        request.finish_reason = reason or "error"
        if reason == "cancelled":
            self.cancelled += 1
        self.metrics.finished.labels(request.finish_reason).inc()
        if error is not None:
            self._emit(request, ("error", error))
        else:
            self._emit(request, ("finish", reason, len(request.output)))

    def _emit(self, request: Request, event: Event) -> None:
        try:
            request.on_event(event)
        except Exception:  # a broken consumer (e.g. its event loop is gone) stops its request
            log.exception("request callback failed")
            request.cancelled = True


def _bucket(n: int, low: int = 16) -> int:
    """A padded size for n (prefill tokens, decode rows): a power of two, at least `low`."""
    return max(low, 1 << (n - 1).bit_length())
