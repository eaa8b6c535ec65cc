"""The KV-cached decode loop and `generate`: equal to recomputing from scratch, sampling rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_lm import tiny_lm

from infer import generate
from infer.decoding import PROMPT_BUCKET, stream_token_ids
from infer.sampling import sample_logits


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture(scope="module")
def model(lm):
    return lm.model


def greedy_without_cache(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        logits = model(jnp.asarray([ids]))
        ids.append(int(jnp.argmax(logits[0, -1])))
    return ids[len(prompt) :]


@pytest.mark.parametrize("prompt_len", [5, PROMPT_BUCKET + 3])
def test_cached_greedy_equals_recomputing_everything(model, prompt_len):
    prompt = list(np.random.default_rng(prompt_len).integers(0, 300, prompt_len))
    ours = list(stream_token_ids(model, prompt, 12))
    assert ours == greedy_without_cache(model, prompt, 12)


def test_same_seed_same_tokens_other_seed_other_tokens(model):
    prompt = [1, 2, 3]

    def run(seed):
        return list(stream_token_ids(model, prompt, 20, temperature=2.0, seed=seed))

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_stop_ids_end_generation_and_are_not_returned(model):
    prompt = [7, 8, 9]
    full = list(stream_token_ids(model, prompt, 10))
    stop = full[4]
    first = full.index(stop)
    assert list(stream_token_ids(model, prompt, 10, stop_ids=frozenset({stop}))) == full[:first]


def test_max_tokens_is_clipped_to_the_context(model):
    prompt = list(range(150))
    assert len(list(stream_token_ids(model, prompt, 50))) == 160 - 150
    with pytest.raises(ValueError, match="context is 160"):
        next(stream_token_ids(model, list(range(160)), 5))
    with pytest.raises(ValueError, match="empty"):
        next(stream_token_ids(model, [], 5))


def test_top_p_keeps_the_smallest_nucleus():
    probs = np.array([0.55, 0.3, 0.1, 0.05])
    logits = jnp.log(jnp.asarray(np.tile(probs, (2000, 1)), jnp.float32))
    draws = np.asarray(sample_logits(logits, jax.random.key(0), 1.0, top_p=0.8))
    assert set(draws) == {0, 1}  # 0.55 < 0.8 needs the second token; 0.85 >= 0.8 stops there
    assert abs((draws == 0).mean() - 0.55 / 0.85) < 0.05
    tiny = np.asarray(sample_logits(logits, jax.random.key(1), 1.0, top_p=0.01))
    assert set(tiny) == {0}
    top2 = np.asarray(sample_logits(logits, jax.random.key(2), 1.0, top_k=2))
    assert set(top2) == {0, 1}


def test_generate_takes_text_or_messages(lm):
    text = generate(lm, "hello", max_tokens=8)
    ids = lm.tokenizer.encode("hello", add_special_tokens=True)
    expected = [t for t in greedy_without_cache(lm.model, ids, 8)]
    stop = [i for i, t in enumerate(expected) if t in lm.tokenizer.stop_ids]
    expected = expected[: stop[0]] if stop else expected
    assert text == lm.tokenizer.decode(expected)

    messages = [{"role": "user", "content": "hi"}]
    chat_ids = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert lm.tokenizer.decode(chat_ids, skip_special_tokens=False).endswith("<s>assistant: ")
    reply = generate(lm, messages, max_tokens=6, temperature=0.7, top_p=0.9, seed=3)
    assert reply == generate(lm, messages, max_tokens=6, temperature=0.7, top_p=0.9, seed=3)


def test_chat_loop_keeps_the_conversation(lm):
    import argparse
    import io

    from infer.chat import chat_loop

    args = argparse.Namespace(
        system="be brief", max_tokens=5, temperature=0.0, top_p=1.0, top_k=None, seed=0
    )
    stdin = io.StringIO("hello\n\n/reset\nagain\nmore\n")
    stdout = io.StringIO()
    messages = chat_loop(lm, args, stdin, stdout)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["again", "more"]
    assert "(conversation cleared)" in stdout.getvalue()
    # The second reply was generated with the first exchange in its prompt.
    first_turn = messages[:3]
    assert messages[4]["content"] == generate(lm, first_turn + [messages[3]], max_tokens=5).strip()


def test_new_sampling_settings_reuse_the_compiled_steps(model):
    from infer import decoding

    list(stream_token_ids(model, [1, 2, 3], 4, temperature=0.7, top_p=0.9))
    sizes = decoding._prefill._cache_size(), decoding._decode_step._cache_size()
    list(stream_token_ids(model, [1, 2, 3], 4, temperature=1.3, top_p=0.5, seed=4))
    assert (decoding._prefill._cache_size(), decoding._decode_step._cache_size()) == sizes
