"""The continuous-batching engine and its paged KV cache, on a tiny random decoder."""

import functools
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_lm import tiny_lm

from infer.engine import Engine, EngineConfig, QueueFull, Request
from infer.kv_cache import BlockAllocator, CacheSpec, block_hashes, with_rows
from infer.sampling import SamplingParams
from models.layers import PagedKVCache

pytestmark = pytest.mark.usefixtures("jax_compile_cache")

CONFIG = EngineConfig(max_batch=8, prefill_chunk=16, max_queue=64)


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture(scope="module")
def engine(lm):
    engine = Engine(lm.model, CONFIG)
    yield engine
    engine.close()


def _prompts(count, seed=0):
    """Prompts of 3..40 tokens; every fourth shares a 36-token prefix with the one before."""
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(count):
        if i % 4 == 3:
            prompts.append(prompts[-1][:36] + [int(t) for t in rng.integers(0, 256, 3)])
        else:
            prompts.append([int(t) for t in rng.integers(0, 256, rng.integers(3, 41))])
    return prompts


def _run(engine, prompts, limits, **params):
    sampling = SamplingParams(**{"temperature": 0.0, **params})
    return engine.generate([Request(p, m, sampling) for p, m in zip(prompts, limits, strict=True)])


def test_32_concurrent_greedy_requests_equal_their_solo_runs(engine):
    prompts = _prompts(32)
    limits = [4 + (7 * i) % 17 for i in range(32)]
    solo = [_run(engine, [p], [m])[0] for p, m in zip(prompts, limits, strict=True)]
    steps = {}  # request index -> engine decode steps at which it produced tokens
    requests = []
    for i, (p, m) in enumerate(zip(prompts, limits, strict=True)):

        def on_event(event, i=i):
            if event[0] == "token":
                steps.setdefault(i, []).append(engine.steps)

        requests.append(Request(p, m, SamplingParams(temperature=0.0), on_event=on_event))
    before = engine.steps
    batched = engine.generate(requests)
    assert batched == solo
    assert [len(o) for o in batched] == limits  # the tiny model emits no stop token here
    # Batched: far fewer decode steps than tokens; requests joined and left mid-flight.
    assert engine.steps - before < sum(limits) / 3
    spans = [(s[0], s[-1]) for s in steps.values()]
    assert any(a0 < b0 <= a1 < b1 for a0, a1 in spans for b0, b1 in spans)
    assert engine.stats() == {**engine.stats(), "running": 0, "waiting": 0, "blocks_used": 0}


def test_waiting_prompts_are_prefilled_together(lm):
    """Five queued prompts of up to 16 tokens: one call prefills five rows (padded to 8), and
    each request's greedy tokens equal its solo run's."""
    engine = Engine(lm.model, EngineConfig(max_batch=8, prefill_chunk=16, prefill_batch=8))
    try:
        prompts = [p[:16] for p in _prompts(5, seed=3)]
        solo = [_run(engine, [p], [5])[0] for p in prompts]
        engine.pause()
        requests = [Request(p, 5, SamplingParams(temperature=0.0)) for p in prompts]
        engine.submit(*requests)
        calls = engine.prefill_calls
        engine.resume()
        deadline = time.time() + 120
        while any(r.finish_reason is None for r in requests) and time.time() < deadline:
            time.sleep(0.01)
        assert [r.output for r in requests] == solo
        assert engine.prefill_calls == calls + 1
    finally:
        engine.close()


def test_prefix_cache_reuses_full_prompt_blocks(engine):
    prompt = _prompts(1, seed=5)[0] + list(range(40))  # > 2 full blocks
    first = _run(engine, [prompt], [8])[0]
    hits = engine.allocator.hits
    again = _run(engine, [prompt], [8])[0]
    assert again == first
    assert engine.allocator.hits - hits == (len(prompt) - 1) // CONFIG.block_size
    # A prompt that shares only the first block reuses just that one.
    other = prompt[:20] + [7] * 30
    hits = engine.allocator.hits
    _run(engine, [other], [2])
    assert engine.allocator.hits - hits == 1


def test_cancel_frees_the_slot_and_blocks(engine):
    started, events = threading.Event(), []

    def on_event(event):
        events.append(event)
        started.set()

    request = Request(list(range(30)), 120, SamplingParams(temperature=0.0), on_event=on_event)
    cancelled = engine.cancelled
    engine.pause()
    engine.submit(request)
    engine.cancel(request)  # cancelled while waiting
    engine.resume()
    assert started.wait(30) and events == [("finish", "cancelled", 0)]
    request = Request(list(range(30)), 120, SamplingParams(temperature=0.0), on_event=on_event)
    started.clear()
    engine.submit(request)
    assert started.wait(30)
    engine.cancel(request)
    deadline = time.monotonic() + 30
    while request.finish_reason is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert request.finish_reason == "cancelled" and len(request.output) < 120
    assert engine.cancelled == cancelled + 2
    assert engine.stats()["blocks_used"] == 0 and engine.stats()["running"] == 0


def test_sampled_requests_are_reproducible_and_stop_ids_stop(engine):
    prompts, limits = _prompts(4, seed=9), [12] * 4
    params = dict(temperature=1.0, top_k=40, top_p=0.9, seed=3, presence_penalty=0.5)
    a = _run(engine, prompts, limits, **params)
    b = _run(engine, prompts[:1], limits[:1], **params)  # alone, it draws the same tokens
    assert b[0] == a[0]
    assert a != _run(engine, prompts, limits, **{**params, "seed": 4})
    stop = a[0][4]
    request = Request(prompts[0], 12, SamplingParams(**params), frozenset({stop}))
    assert engine.generate([request])[0] == a[0][: a[0].index(stop)]
    assert request.finish_reason == "stop"


def test_logit_bias_and_logprobs(engine):
    events = []
    params = SamplingParams(temperature=0.0, logit_bias=((42, 100.0),), logprobs=3)
    request = Request([1, 2, 3], 3, params, on_event=events.append)
    assert engine.generate([request])[0] == [42, 42, 42]
    tokens = [e for e in events if e[0] == "token"]
    assert all(len(e[3]) == 3 and e[2] <= 0 for e in tokens)
    assert all(e[3][0][1] >= e[3][1][1] >= e[3][2][1] for e in tokens)


def test_requests_that_cannot_run_are_refused(lm, engine):
    with pytest.raises(ValueError, match="context is 160"):
        engine.submit(Request(list(range(160)), 1))
    with pytest.raises(ValueError, match="top_p"):
        engine.submit(Request([1], 1, SamplingParams(top_p=0.0)))
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        Engine(lm.model, EngineConfig(num_blocks=5))
    engine.pause()
    try:
        with pytest.raises(QueueFull):
            engine.submit(*[Request([1], 1) for _ in range(CONFIG.max_queue + 1)])
        assert engine.stats()["waiting"] == 0  # all or none
    finally:
        engine.resume()


def test_a_short_cache_makes_requests_wait_and_preempts(engine):
    prompts, limits = _prompts(6, seed=2), [40] * 6
    expected = _run(engine, prompts, limits)  # room for all: no preemption
    # Hold all but 10 blocks (one full context): 6 sequences of up to 5 blocks must take turns.
    held, _ = engine.allocator.allocate((engine.allocator.capacity - 10) * CONFIG.block_size)
    preemptions = engine.metrics.registry.get_sample_value("jaxlm_preemptions_total")
    try:
        assert _run(engine, prompts, limits) == expected
        assert engine.metrics.registry.get_sample_value("jaxlm_preemptions_total") > preemptions
        assert engine.allocator.used == len(held)
    finally:
        engine.allocator.release(held)


def test_block_allocator_refcounts_and_evicts():
    allocator = BlockAllocator(num_blocks=5, block_size=4)
    hashes = block_hashes(list(range(9)), 4)
    assert len(hashes) == 2 and hashes != block_hashes([0, 1, 2, 3, 9, 9, 9, 9], 4)
    table, hit = allocator.allocate(9, hashes)
    assert hit == 0 and len(table) == 3 and 0 not in table and allocator.used == 3
    allocator.register(table, hashes)
    shared, hit = allocator.allocate(8, hashes)
    assert hit == 2 and shared == table[:2] and allocator.used == 3
    allocator.release(table)
    allocator.release(shared)
    assert allocator.used == 0
    assert not allocator.can_allocate(17)
    big, _ = allocator.allocate(16)  # evicts the cached prefix to reuse its blocks
    assert allocator.cached_prefix(hashes) == [] and allocator.used == 4


@functools.partial(jax.jit, static_argnums=0)
def _paged_forward(graphdef, state, tokens, positions, cache):
    return nnx.merge(graphdef, state)(tokens, positions=positions, cache=cache)


def test_paged_decode_kernel_reads_the_layer_being_run(lm):
    """A one-token decode step through the Pallas paged kernel (interpret mode on CPU) gives the
    gather path's logits: each layer passes the kernel its own pages of the stacked cache."""
    import dataclasses

    cfg = lm.model.cfg
    spec = CacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 12, 16, cfg.max_seq_len)
    table = jnp.asarray([[7, 2, 9, 0]], jnp.int32)
    prompt = jnp.asarray([list(range(3, 21))], jnp.int32)  # 18 tokens, then one more
    logits = {}
    for impl in ("xla", "pallas"):
        model = nnx.clone(lm.model)
        for module in (model, *(m for _, m in nnx.iter_graph(model) if hasattr(m, "cfg"))):
            module.cfg = dataclasses.replace(cfg, attention_impl=impl)
        graphdef, state = nnx.split(model)
        rows = with_rows(spec.init(), table, jnp.asarray([0]), jnp.asarray([18]))
        _, cache = _paged_forward(graphdef, state, prompt, jnp.arange(18)[None], rows)
        step = with_rows(cache, table, jnp.asarray([18]), jnp.asarray([1]))
        out, _ = _paged_forward(graphdef, state, jnp.asarray([[21]]), jnp.asarray([[18]]), step)
        logits[impl] = out
    np.testing.assert_allclose(logits["pallas"], logits["xla"], atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_paged_cache_equals_a_full_forward(lm, dtype):
    """Three prefill chunks and one decode token through scattered pages == no cache."""
    model, cfg = lm.model, lm.model.cfg
    spec = CacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 12, 16, cfg.max_seq_len, dtype)
    cache = spec.init()
    tokens = jnp.asarray([list(range(3, 40))], jnp.int32)  # 37 tokens
    full = model(tokens)
    graphdef, state = nnx.split(model)
    table = jnp.asarray([[7, 2, 9, 0, 0, 0, 0, 0, 0, 0]], jnp.int32)
    logits = []
    for start, stop in ((0, 10), (10, 26), (26, 36), (36, 37)):
        chunk = jnp.zeros((1, 16), jnp.int32).at[0, : stop - start].set(tokens[0, start:stop])
        rows = with_rows(cache, table, jnp.asarray([start]), jnp.asarray([stop - start]))
        positions = start + jnp.arange(16)[None]
        out, cache = _paged_forward(graphdef, state, chunk, positions, rows)
        logits.append(out[:, : stop - start])
        assert isinstance(cache, PagedKVCache)
    logits = jnp.concatenate(logits, axis=1)
    if dtype == "float32":
        np.testing.assert_allclose(logits, full, atol=1e-4)
    else:  # int8 keys and values: close, and mostly the same top token
        error = jnp.abs(logits - full)
        assert float(jnp.max(error)) < 0.15 * float(jnp.std(full)), float(jnp.max(error))
        assert float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(full, -1))) >= 0.9
