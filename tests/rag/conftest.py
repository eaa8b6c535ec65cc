"""Fixtures for RAG tests: a fresh fake embedder per test."""

import pytest
from rag_fakes import FakeEmbedder


@pytest.fixture
def fake_embedder():
    return FakeEmbedder()
