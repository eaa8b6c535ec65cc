"""Tests for models/decoder.py: causality, packing, KV cache, GQA, presets, numerics options."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import config as config_lib
from models.decoder import Decoder, logical_axes

pytestmark = pytest.mark.usefixtures("jax_compile_cache")


def _tokens(shape, vocab, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=shape), jnp.int32)


def _flat_params(module_or_state):
    state = (
        module_or_state
        if isinstance(module_or_state, nnx.State)
        else nnx.state(module_or_state, nnx.Param)
    )
    return nnx.to_flat_state(nnx.filter_state(state, nnx.Param))


# ------------------------------------------------------------------------------------------------
# Properties of the forward pass.


@pytest.mark.parametrize("t", [0, 3, 7, 14])
def test_changing_a_future_token_never_changes_past_logits(tiny_model, t):
    cfg = tiny_model.cfg
    tokens = _tokens((2, 16), cfg.vocab_size)
    changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % cfg.vocab_size)
    before, after = tiny_model.forward(tokens), tiny_model.forward(changed)
    assert before.dtype == jnp.float32 and before.shape == (2, 16, cfg.vocab_size)
    np.testing.assert_array_equal(before[:, : t + 1], after[:, : t + 1])
    # The changed position itself must see its new token, or the check above is vacuous.
    assert float(jnp.abs(before[:, t + 1] - after[:, t + 1]).max()) > 1e-3


def test_packed_segments_equal_separate_sequences(tiny_model):
    vocab = tiny_model.cfg.vocab_size
    first, second = _tokens((6,), vocab, seed=1), _tokens((7,), vocab, seed=2)
    # Row 0 packs both sequences and 3 padding tokens; row 1 is a third, unpadded sequence.
    packed = jnp.stack(
        [
            jnp.concatenate([first, second, jnp.zeros((3,), jnp.int32)]),
            _tokens((16,), vocab, seed=3),
        ]
    )
    segment_ids = jnp.asarray([[1] * 6 + [2] * 7 + [0] * 3, [1] * 16], jnp.int32)
    positions = jnp.asarray([list(range(6)) + list(range(7)) + [0] * 3, list(range(16))], jnp.int32)
    logits = tiny_model.forward(packed, positions, segment_ids)

    # Each sequence alone, at the start of its row (what follows cannot leak: causality).
    alone = jnp.zeros((2, 16), jnp.int32).at[0, :6].set(first).at[1, :7].set(second)
    alone_logits = tiny_model.forward(alone)
    np.testing.assert_allclose(logits[0, :6], alone_logits[0, :6], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[0, 6:13], alone_logits[1, :7], rtol=1e-5, atol=1e-5)
    # One segment with explicit positions 0..T-1 is the default (no segment ids, no positions).
    np.testing.assert_allclose(logits[1], tiny_model.forward(packed)[1], rtol=1e-5, atol=1e-5)

    # Whatever sits in the padding (segment 0) leaves the real tokens untouched.
    other_pad = packed.at[0, 13:].set(_tokens((3,), vocab, seed=4))
    other = tiny_model.forward(other_pad, positions, segment_ids)
    np.testing.assert_array_equal(logits[0, :13], other[0, :13])
    # And the first sequence cannot see the second.
    other_second = packed.at[0, 6:13].set(_tokens((7,), vocab, seed=5))
    np.testing.assert_array_equal(
        logits[0, :6], tiny_model.forward(other_second, positions, segment_ids)[0, :6]
    )


def test_kv_cache_decoding_matches_full_forward(tiny_model):
    """Prefill a prompt, then decode one token at a time: the logits of the full forward."""
    tm = tiny_model
    batch, total, prompt_len = 2, 12, 5
    tokens = _tokens((batch, total), tm.cfg.vocab_size, seed=5)

    @jax.jit
    def cached(state, tokens, cache):
        return nnx.merge(tm.graphdef, state)(tokens, cache=cache)

    # The cache is longer than the text: unwritten slots must stay invisible.
    cache = tm.model.init_cache(batch, total + 4)
    assert cache.key.shape == (
        tm.cfg.num_layers,
        batch,
        total + 4,
        tm.cfg.num_kv_heads,
        tm.cfg.head_dim,
    )
    logits, cache = cached(tm.state, tokens[:, :prompt_len], cache)
    steps = [logits]
    for t in range(prompt_len, total):
        logits, cache = cached(tm.state, tokens[:, t : t + 1], cache)
        steps.append(logits)
    decoded = jnp.concatenate(steps, axis=1)
    np.testing.assert_array_equal(cache.index, np.full((tm.cfg.num_layers,), total))
    np.testing.assert_allclose(decoded, tm.forward(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_gqa_equals_mha_with_repeated_kv_weights(tiny, num_kv_heads):
    cfg = tiny.llama(num_kv_heads=num_kv_heads, qkv_bias=True)
    groups = cfg.num_heads // num_kv_heads
    gqa = Decoder(cfg, rngs=nnx.Rngs(0))
    # Biases start at zero; make them random so that their repetition is tested too.
    params = nnx.to_pure_dict(nnx.state(gqa, nnx.Param))
    rng = np.random.default_rng(0)
    for name in ("q_bias", "k_bias", "v_bias"):
        shape = params["blocks"]["attn"][name].shape
        params["blocks"]["attn"][name] = jnp.asarray(rng.normal(0, 0.2, shape), jnp.float32)
    nnx.update(gqa, params)

    mha_cfg = cfg.replace(num_kv_heads=cfg.num_heads)
    mha = nnx.eval_shape(lambda: Decoder(mha_cfg, rngs=nnx.Rngs(1)))  # every weight set below
    attn = params["blocks"]["attn"]
    # Query head n reads kv head n // groups: repeat each kv head `groups` times in place.
    for name in ("k_proj", "v_proj"):  # [L, D, K, H]
        attn[name] = jnp.repeat(attn[name], groups, axis=2)
    for name in ("k_bias", "v_bias"):  # [L, K, H]
        attn[name] = jnp.repeat(attn[name], groups, axis=1)
    nnx.update(mha, params)

    tokens = _tokens((2, 10), cfg.vocab_size)
    np.testing.assert_allclose(nnx.jit(gqa)(tokens), nnx.jit(mha)(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_bf16_compute_with_fp32_params_is_close_to_fp32(tiny_models, family):
    tiny_model = tiny_models(family)
    cfg = tiny_model.cfg.replace(dtype="bfloat16")
    bf16 = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    for _, variable in _flat_params(bf16):
        assert variable.get_value().dtype == jnp.float32
    # Same weights: the bf16 graph merged with the fp32 model's state.
    tokens = _tokens((2, 16), tiny_model.cfg.vocab_size)
    reference = tiny_model.forward(tokens)
    graphdef = nnx.graphdef(bf16)
    bf16_logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(tiny_model.state, tokens)
    assert bf16_logits.dtype == jnp.float32
    assert bool(jnp.isfinite(bf16_logits).all())
    scale = float(jnp.abs(reference).max())
    np.testing.assert_allclose(bf16_logits, reference, atol=0.05 * scale)


def _loss_and_grads(cfg, state, tokens):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))

    @jax.jit
    def loss_and_grads(state, tokens):
        def loss_fn(state):
            logits = nnx.merge(graphdef, state)(tokens[:, :-1])
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

        return jax.value_and_grad(loss_fn)(state)

    return loss_and_grads(state, tokens)


@pytest.fixture(scope="module")
def no_remat(tiny):
    """(cfg, state, tokens, loss, grads) of the Llama-style model without rematerialisation."""
    cfg = tiny.llama()
    state = nnx.state(Decoder(cfg, rngs=nnx.Rngs(0)))
    tokens = _tokens((2, 17), cfg.vocab_size)
    return (cfg, state, tokens) + tuple(_loss_and_grads(cfg, state, tokens))


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policies_give_the_same_loss_and_grads(no_remat, policy):
    cfg, state, tokens, loss, grads = no_remat
    remat_loss, remat_grads = _loss_and_grads(cfg.replace(remat_policy=policy), state, tokens)
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), remat_grads, grads
    )


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_unrolled_scan_gives_the_same_logits(tiny_models, family):
    tiny_model = tiny_models(family)
    cfg = tiny_model.cfg
    unrolled = nnx.graphdef(
        nnx.eval_shape(lambda: Decoder(cfg.replace(scan_unroll=cfg.num_layers), rngs=nnx.Rngs(0)))
    )
    tokens = _tokens((2, 16), cfg.vocab_size)
    logits = jax.jit(lambda s, x: nnx.merge(unrolled, s)(x))(tiny_model.state, tokens)
    np.testing.assert_allclose(logits, tiny_model.forward(tokens), rtol=1e-5, atol=1e-5)


def test_dropout_only_with_a_key(tiny, tiny_models):
    reference = tiny_models("gpt2")  # the same weights: dropout_rate does not change init
    cfg = reference.cfg.replace(dropout_rate=0.5)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    run = jax.jit(lambda s, x, k: nnx.merge(graphdef, s)(x, dropout_key=k))
    tokens = _tokens((2, 16), cfg.vocab_size)
    key = jax.random.key(0)
    np.testing.assert_array_equal(run(reference.state, tokens, None), reference.forward(tokens))
    with_key = run(reference.state, tokens, key)
    np.testing.assert_array_equal(with_key, run(reference.state, tokens, key))
    assert not np.allclose(with_key, reference.forward(tokens))


# ------------------------------------------------------------------------------------------------
# Parameters: presets at full size (shapes only) and logical axis names.

PUBLISHED = {
    # Hugging Face parameter counts of the released checkpoints (tied heads counted once).
    "gpt2-124m": 124_439_808,
    "smollm2-135m": 134_515_008,
    "llama3-8b": 8_030_261_248,
    "qwen2-0.5b": 494_032_768,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count_matches_published(name):
    cfg = config_lib.preset(name)
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))  # no weights allocated
    count = sum(math.prod(v.get_value().shape) for _, v in _flat_params(model))
    assert count == cfg.num_params() == PUBLISHED[name]


def test_smollm2_shapes():
    cfg = config_lib.smollm2_135m()
    assert (cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_dim) == (
        30,
        576,
        9,
        3,
        1536,
    )
    assert cfg.head_dim == 64 and cfg.rope_theta == 100000.0 and cfg.tie_embeddings
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    shapes = {path: v.get_value().shape for path, v in _flat_params(model)}
    assert shapes[("blocks", "attn", "q_proj")] == (30, 576, 9, 64)
    assert shapes[("blocks", "attn", "k_proj")] == (30, 576, 3, 64)
    assert shapes[("blocks", "mlp", "gate_proj")] == (30, 576, 1536)
    assert shapes[("embed", "embedding")] == (49152, 576)
    assert ("lm_head",) not in shapes


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_parameter_names_its_logical_axes(tiny, family):
    cfg = tiny.gpt2() if family == "gpt2" else tiny.llama()
    state = nnx.state(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    names = nnx.to_flat_state(logical_axes(state))
    flat = _flat_params(state)
    assert len(flat) == len(names) and len(flat) >= 10
    for (path, variable), (name_path, axes) in zip(flat, names, strict=True):
        assert path == name_path
        assert isinstance(axes, tuple), f"{path} has no logical_axes"
        assert len(axes) == variable.get_value().ndim, f"{path}: {axes} vs {variable.shape}"
        assert (axes[0] == "layers") == (path[0] == "blocks"), f"{path}: {axes}"


# ------------------------------------------------------------------------------------------------
# GLM: prefix-LM mask and 2D positions.


@pytest.fixture(scope="module")
def glm(tiny):
    cfg = tiny.gpt2(block_positions=True)
    return Decoder(cfg, rngs=nnx.Rngs(0))


def _glm_inputs(n=7, total=12):
    tokens = _tokens((1, total), 64, seed=9)
    positions = jnp.asarray([list(range(n)) + [3] * (total - n)], jnp.int32)
    blocks = jnp.asarray([[0] * n + list(range(1, total - n + 1))], jnp.int32)
    return tokens, positions, blocks, jnp.asarray([n], jnp.int32)


def test_prefix_lm_context_sees_both_ways_and_never_the_span(glm):
    tokens, positions, blocks, prefix = _glm_inputs()

    def logits(t):
        return glm(t, positions=positions, block_positions=blocks, prefix_len=prefix)

    base = logits(tokens)
    in_context = logits(tokens.at[0, 5].set((tokens[0, 5] + 1) % 64))
    assert float(jnp.abs(in_context[0, 2] - base[0, 2]).max()) > 1e-4  # context is bidirectional
    in_span = logits(tokens.at[0, 9].set((tokens[0, 9] + 1) % 64))
    np.testing.assert_array_equal(in_span[0, :9], base[0, :9])  # nothing before sees the span
    assert float(jnp.abs(in_span[0, 10] - base[0, 10]).max()) > 1e-4  # later span tokens do
    # The block (in-span) positions reach the model.
    shifted = glm(tokens, positions=positions, block_positions=blocks * 0, prefix_len=prefix)
    assert float(jnp.abs(shifted[0, 8] - base[0, 8]).max()) > 1e-4


def test_glm_cached_decoding_matches_the_full_forward(glm):
    tokens, positions, blocks, prefix = _glm_inputs()
    full = glm(tokens, positions=positions, block_positions=blocks, prefix_len=prefix)
    cache = glm.init_cache(1, 16)
    logits, cache = glm(
        tokens[:, :8], positions=positions[:, :8], cache=cache, block_positions=blocks[:, :8],
        prefix_len=prefix,
    )  # fmt: skip
    steps = [logits]
    for t in range(8, 12):
        logits, cache = glm(
            tokens[:, t : t + 1], positions=positions[:, t : t + 1], cache=cache,
            block_positions=blocks[:, t : t + 1], prefix_len=prefix,
        )  # fmt: skip
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Attention implementations.


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pallas_attention_model_matches_xla(tiny, family):
    """The Pallas flash-attention path (interpret mode on CPU) gives the XLA model's logits and
    gradients, with GQA and packed segments."""
    make = tiny.llama if family == "llama" else tiny.gpt2
    cfg = make(embed_dim=128, num_heads=2, **({"num_kv_heads": 1} if family == "llama" else {}))
    assert cfg.head_dim == 64
    xla = Decoder(cfg, rngs=nnx.Rngs(0))
    pallas = Decoder(cfg.replace(attention_impl="pallas"), rngs=nnx.Rngs(0))
    tokens = _tokens((2, 24), cfg.vocab_size, seed=11)
    segments = jnp.asarray([[1] * 10 + [2] * 14, [1] * 20 + [0] * 4], jnp.int32)
    positions = jnp.asarray([list(range(10)) + list(range(14)), list(range(24))], jnp.int32)

    def loss(model):
        logits = model(tokens, positions=positions, segment_ids=segments)
        return (logits * (segments > 0)[..., None]).mean(), logits

    (l_x, logits_x), g_x = nnx.value_and_grad(loss, has_aux=True)(xla)
    (l_p, logits_p), g_p = nnx.value_and_grad(loss, has_aux=True)(pallas)
    real = np.asarray(segments > 0)
    np.testing.assert_allclose(np.asarray(logits_p)[real], np.asarray(logits_x)[real], atol=2e-5)
    for a, b in zip(jax.tree.leaves(g_x), jax.tree.leaves(g_p), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_biased_attention_refuses_pallas(tiny):
    with pytest.raises(ValueError, match="takes no score bias"):
        tiny.gpt2(position="alibi", attention_impl="pallas")
