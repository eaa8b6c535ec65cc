"""The per-row batched sampler of the engine: every setting on random logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer.sampling import ROW_FIELDS, SamplingParams, sample_rows, seed_key_data

pytestmark = pytest.mark.usefixtures("jax_compile_cache")
V = 50


def _draw(logits, params, steps=None, counts=None, seen=None, bias=None):
    """Samples each row of logits [B, V] with its own SamplingParams."""
    b = logits.shape[0]
    rows = jnp.asarray([p.row() for p in params], jnp.float32)
    keys = jnp.asarray(np.stack([seed_key_data(p.seed) for p in params]))
    steps = jnp.zeros(b, jnp.int32) if steps is None else jnp.asarray(steps, jnp.int32)
    counts = jnp.zeros((b, V), jnp.int32) if counts is None else counts
    seen = jnp.zeros((b, V), bool) if seen is None else seen
    bias = jnp.zeros((b, V), jnp.float32) if bias is None else bias
    out = _jitted(logits, rows, keys, steps, counts, seen, bias)
    return [np.asarray(x) for x in out]


_jitted = jax.jit(sample_rows)


@pytest.fixture(scope="module")
def logits():
    return jax.random.normal(jax.random.key(0), (4, V)) * 3


def test_greedy_rows_take_the_argmax_beside_sampled_rows(logits):
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=1)] * 2
    params[3] = SamplingParams(temperature=1.0, seed=1, logprobs=5)  # the top-20 for every row
    tokens, lp, top_ids, top_lp = _draw(logits, params)
    best = np.argmax(np.asarray(logits), axis=-1)
    assert tokens[0] == best[0] and tokens[2] == best[2]
    np.testing.assert_allclose(lp, np.take_along_axis(jax.nn.log_softmax(logits), tokens[:, None],
                                                      -1)[:, 0], rtol=1e-5)  # fmt: skip
    assert (top_ids[:, 0] == best).all() and (np.diff(top_lp, axis=-1) <= 0).all()


def test_all_greedy_rows_skip_drawing_and_top_logprobs(logits):
    """No row samples or asks for logprobs: the argmax, its log-probability, no top-20."""
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logprobs=0)] * 2
    tokens, lp, top_ids, top_lp = _draw(logits, params)
    best = np.argmax(np.asarray(logits), axis=-1)
    np.testing.assert_array_equal(tokens, best)
    np.testing.assert_allclose(lp, jax.nn.log_softmax(logits).max(-1), rtol=1e-5)
    assert not top_ids.any() and not top_lp.any()


def test_top_k_one_and_min_p_one_are_greedy(logits):
    best = np.argmax(np.asarray(logits), axis=-1)
    for params in (dict(top_k=1), dict(min_p=1.0), dict(top_p=1e-6)):
        tokens = _draw(
            logits, [SamplingParams(temperature=1.5, seed=s, **params) for s in range(4)]
        )
        assert (tokens[0] == best).all(), params


def test_top_k_keeps_only_the_k_best(logits):
    allowed = np.argsort(-np.asarray(logits[0]))[:3]
    for step in range(30):
        params = [SamplingParams(temperature=2.0, top_k=3, seed=7)]
        assert _draw(logits[:1], params, steps=[step])[0][0] in allowed


def test_a_row_draws_the_same_token_whatever_its_neighbours(logits):
    params = [SamplingParams(temperature=1.0, seed=s) for s in (5, 6, 7, 8)]
    alone = _draw(logits[2:3], params[2:3], steps=[4])[0][0]
    together = _draw(logits, params, steps=[4] * 4)[0][2]
    assert alone == together
    draws = {int(_draw(logits[:1], params[:1], steps=[s])[0][0]) for s in range(20)}
    assert len(draws) > 1  # the step moves the key


def test_penalties_and_logit_bias_move_the_choice(logits):
    best = int(np.argmax(np.asarray(logits[0])))
    onehot = jnp.zeros((1, V), bool).at[0, best].set(True)
    greedy = SamplingParams(temperature=0.0)
    assert _draw(logits[:1], [greedy], bias=jnp.where(onehot, -100.0, 0.0))[0][0] != best
    assert _draw(logits[:1], [greedy], bias=jnp.zeros((1, V)).at[0, 3].set(100.0))[0][0] == 3
    penalised = SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0)
    counts = onehot.astype(jnp.int32) * 10
    assert _draw(logits[:1], [penalised], counts=counts)[0][0] != best
    repeated = SamplingParams(temperature=0.0, repetition_penalty=1e3)
    assert _draw(logits[:1], [repeated], seen=onehot)[0][0] != best


def test_settings_are_checked():
    assert len(SamplingParams().row()) == len(ROW_FIELDS)
    for bad in (dict(top_p=0.0), dict(min_p=2.0), dict(temperature=-1.0), dict(logprobs=21)):
        with pytest.raises(ValueError):
            SamplingParams(**bad).check(V)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=((V, 1.0),)).check(V)
