"""Flax NNX models built from one layer library (`models.layers`)."""

from models.config import PRESETS, ModelConfig, preset
from models.decoder import Decoder

__all__ = ["PRESETS", "Decoder", "ModelConfig", "preset"]
