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


@pytest.fixture(scope="session")
def _xla_cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def jax_compile_cache(_xla_cache_dir):
    """Fast compiles for test modules that build many tiny models and train steps.

    Two switches, restored when the module ends: a persistent XLA compilation cache (one
    directory per session), so repeated identical programs (e.g. several `train_and_evaluate`
    runs of one tiny config) compile once; and `jax_disable_most_optimizations`, which halves
    XLA:CPU compile time, the bulk of these tests' time. The tests check what the code computes
    (properties, equalities between runs), not how fast XLA makes it. Opt in with
    `pytestmark = pytest.mark.usefixtures("jax_compile_cache")`.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    settings = {
        "jax_compilation_cache_dir": _xla_cache_dir,
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
        "jax_disable_most_optimizations": True,
    }
    saved = {name: jax.config.values[name] for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()  # the next module starts without a cache
