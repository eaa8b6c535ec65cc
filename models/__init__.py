"""Flax NNX models built from one layer library (`models.layers`), and their loaders."""

from models.clip import CLIP, CLIPConfig
from models.config import PRESETS, ModelConfig, preset
from models.decoder import Decoder
from models.encoder import Encoder

__all__ = [
    "CLIP",
    "PRESETS",
    "CLIPConfig",
    "Decoder",
    "Encoder",
    "ModelConfig",
    "build_model",
    "load_pretrained",
    "preset",
]


def build_model(cfg: ModelConfig, rngs):
    """The model class `cfg.architecture` names, built with `cfg` (Decoder, Encoder or T5).

    With `cfg.quant` set, its projections are then weight-only quantized (models/quantize.py).
    """
    from flax import nnx

    from models.t5 import T5

    cls = {"decoder": Decoder, "encoder": Encoder, "encoder_decoder": T5}[cfg.architecture]
    model = cls(cfg, rngs=rngs if isinstance(rngs, nnx.Rngs) else nnx.Rngs(rngs))
    if cfg.quant != "none":
        from models.quantize import quantize

        quantize(model, cfg.quant, cfg.quant_group_size or None)
    return model


def __getattr__(name: str):
    # The loaders pull in gguf, tokenizers and jinja2; import them only when asked for.
    if name == "load_pretrained":
        from models.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'models' has no attribute {name!r}")
