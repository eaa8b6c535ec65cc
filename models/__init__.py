"""Flax NNX models built from one layer library (`models.layers`), and their loaders."""

from models.config import PRESETS, ModelConfig, preset
from models.decoder import Decoder
from models.encoder import Encoder

__all__ = [
    "PRESETS",
    "Decoder",
    "Encoder",
    "ModelConfig",
    "build_model",
    "load_pretrained",
    "preset",
]


def build_model(cfg: ModelConfig, rngs):
    """The model class `cfg.architecture` names, built with `cfg` (Decoder, Encoder or T5)."""
    from flax import nnx

    from models.t5 import T5

    cls = {"decoder": Decoder, "encoder": Encoder, "encoder_decoder": T5}[cfg.architecture]
    return cls(cfg, rngs=rngs if isinstance(rngs, nnx.Rngs) else nnx.Rngs(rngs))


def __getattr__(name: str):
    # The loaders pull in gguf, tokenizers and jinja2; import them only when asked for.
    if name == "load_pretrained":
        from models.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'models' has no attribute {name!r}")
