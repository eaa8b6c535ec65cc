"""Ahead-of-time compilation of the sharded train step for a TPU slice (libtpu, no TPU chip).

libtpu describes the slice even under JAX_PLATFORMS=cpu (it opens no TPU), so this runs in the
test process. libtpu is fetched into the project's cache on first use (`aot.libtpu_available`);
skipped, with the reason, only where it cannot be installed (no Linux x86_64 wheel, no registry).
"""

from __future__ import annotations

import pytest

from models.config import ModelConfig
from parallel import aot

_OK, _REASON = aot.libtpu_available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"needs libtpu for TPU AOT: {_REASON}")

TINY = ModelConfig(
    # Shards of 128 columns: TPU tiles pad a minor dimension to 128, which would blur the sizes.
    vocab_size=512,
    num_layers=2,
    embed_dim=512,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=1024,
    max_seq_len=128,
    dtype="bfloat16",
)
BATCH, SEQ = 8, 128


@pytest.fixture(scope="module")
def v5e_2x2():
    return aot.tpu_topology("v5e:2x2")


@pytest.fixture(scope="module")
def fsdp_report(v5e_2x2):
    return aot.compile_train_step(TINY, {"fsdp": -1}, "fsdp", v5e_2x2, BATCH, SEQ)


def test_topology_describes_the_slice(v5e_2x2):
    assert v5e_2x2.num_devices == 4 and v5e_2x2.num_chips == 4
    assert {d.platform for d in v5e_2x2.devices} == {"tpu"}
    assert "v5" in v5e_2x2.device_kind
    assert v5e_2x2.hbm_bytes == 16 * aot.GiB


def test_topology_rejects_unknown_chip():
    with pytest.raises(ValueError, match="v9x"):
        aot.tpu_topology("v9x:2x2")


def test_train_step_memory_analysis_is_sane(fsdp_report):
    r = fsdp_report
    assert r.error is None and r.fits
    assert r.mesh == {"pipeline": 1, "data": 1, "fsdp": 4, "tensor": 1}
    # The train state (float32 params + Adam mu and nu, sharded 4 ways) is at least 12 bytes per
    # parameter / 4 and the batch shard is tiny; the state is donated, so outputs alias it.
    state_bytes = 12 * TINY.num_params() / 4
    assert state_bytes <= r.argument_bytes <= 1.2 * state_bytes
    assert r.alias_bytes >= 0.9 * state_bytes
    assert r.output_bytes >= r.alias_bytes
    assert r.temp_bytes >= 0 and r.generated_code_bytes > 0
    assert r.peak_bytes < 0.1 * r.hbm_bytes


@pytest.mark.slow
def test_fsdp_shards_the_state_dp_replicates_it(v5e_2x2, fsdp_report):
    dp = aot.compile_train_step(TINY, {"data": -1}, "dp", v5e_2x2, BATCH, SEQ)
    # Data parallelism keeps a whole copy of the state per device: ~4x FSDP's arguments.
    assert 3.0 < dp.argument_bytes / fsdp_report.argument_bytes < 4.5
