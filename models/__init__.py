"""Flax NNX models built from one layer library (`models.layers`), and their loaders."""

from models.config import PRESETS, ModelConfig, preset
from models.decoder import Decoder
from models.encoder import Encoder

__all__ = ["PRESETS", "Decoder", "Encoder", "ModelConfig", "load_pretrained", "preset"]


def __getattr__(name: str):
    # The loaders pull in gguf, tokenizers and jinja2; import them only when asked for.
    if name == "load_pretrained":
        from models.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'models' has no attribute {name!r}")
