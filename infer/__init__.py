"""Inference: sampling from trained and pretrained models."""
