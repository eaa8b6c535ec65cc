"""Inference: KV-cached generation from trained and pretrained models."""

from infer.decoding import generate, generate_stream

__all__ = ["generate", "generate_stream"]
