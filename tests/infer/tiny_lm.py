"""A tiny language model for the inference tests: a random decoder and a byte-level tokenizer."""

import dataclasses

import tokenizers
from flax import nnx

from models import Decoder, ModelConfig
from models.tokenizer import Tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


@dataclasses.dataclass
class LM:
    """What `infer.generate` and the server need of a loaded model."""

    model: Decoder
    tokenizer: Tokenizer


def tiny_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=300, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
        max_seq_len=160, init_std=0.2,
    )  # fmt: skip


def byte_tokenizer() -> Tokenizer:
    """A byte-level BPE with no merges: one token per byte, plus <s> and </s>."""
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, []))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    backend.add_special_tokens(["<s>", "</s>"])
    return Tokenizer(
        backend,
        special_tokens={"bos_token": "<s>", "eos_token": "</s>"},
        chat_template=CHAT_TEMPLATE,
    )


def tiny_lm() -> LM:
    return LM(Decoder(tiny_config(), rngs=nnx.Rngs(0)), byte_tokenizer())
