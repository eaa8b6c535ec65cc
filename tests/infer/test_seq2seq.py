"""Encoder-decoder generation (infer.sampling.generate_seq2seq) on the tiny T5 fixture: greedy
equals re-running the whole decoder per token, and sampling follows the decoder-only rule."""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from infer.sampling import fill_spans, generate_seq2seq
from models import hf

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "golden" / "t5"


@pytest.fixture(scope="module")
def t5():
    _, model, config = hf.load_hf_dir(GOLDEN)
    reference = np.load(GOLDEN / "reference.npz")
    length = int(reference["attention_mask"][0].sum())
    return model, reference["input_ids"][:1, :length], config


def test_greedy_equals_the_uncached_decoder(t5):
    model, inputs, config = t5
    start = config.get("decoder_start_token_id", 0)
    tokens = generate_seq2seq(model, inputs, 6, start)
    decoded = [start]
    for _ in range(6):  # the whole decoder over the prefix, argmax of the last position
        logits = model(jnp.asarray(inputs), jnp.asarray([decoded]))
        decoded.append(int(jnp.argmax(logits[0, -1])))
    assert tokens.shape == (1, 6) and tokens[0].tolist() == decoded[1:]
    assert fill_spans(model, inputs[0], start, 6).tolist() == decoded[1:]  # [S] in, [L] out


def test_sampling_is_seeded_and_top_k_one_is_greedy(t5):
    model, inputs, config = t5
    start = config.get("decoder_start_token_id", 0)
    greedy = generate_seq2seq(model, inputs, 8, start)
    draw = {s: generate_seq2seq(model, inputs, 8, start, temperature=2.0, seed=s) for s in (0, 1)}
    again = generate_seq2seq(model, inputs, 8, start, temperature=2.0, seed=0)
    np.testing.assert_array_equal(draw[0], again)
    assert not np.array_equal(draw[0], draw[1])
    top1 = generate_seq2seq(model, inputs, 8, start, temperature=2.0, top_k=1, seed=3)
    np.testing.assert_array_equal(top1, greedy)
