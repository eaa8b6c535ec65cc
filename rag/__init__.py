"""Retrieval-augmented generation (planned: see the issues)."""
