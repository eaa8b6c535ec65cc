"""A checkpoint written under one mesh restores under another and training continues the same.

Runs in its own subprocess (8 fake CPU devices, see conftest.py), in parallel with
test_sharded_train.py under pytest-xdist.
"""

from __future__ import annotations

import pytest

# Device 0's shard of q_proj [L=2, D=32, N=4, H=8] under FSDP=4 x TP=2.
Q_PROJ_FSDP4_TP2 = [2, 8, 2, 8]


@pytest.fixture(scope="module")
def results(run_sharded_check, tmp_path_factory) -> dict:
    checkpoint_dir = str(tmp_path_factory.mktemp("ckpt") / "run")
    return run_sharded_check({"checkpoint_dir": checkpoint_dir, "batch_error": True})


def test_checkpoint_from_one_mesh_resumes_on_another(results):
    """Saved under FSDP=8, restored under FSDP=4 x TP=2: same values, new shards, same step 2."""
    r = results["checkpoint"]
    assert r["restored_err"] == 0.0
    assert r["restored_shardings_ok"]
    assert r["restored_param_shards"]["blocks/attn/q_proj"] == Q_PROJ_FSDP4_TP2
    assert r["step"] == 2
    assert r["loss_b"] == pytest.approx(r["loss_a"], rel=1e-5)
    assert r["params_err"] < 1e-5
    assert r["opt_state_err"] < 1e-5


def test_batch_size_must_divide_the_batch_shards(results):
    assert "global batch size 6 is not divisible by the 8 batch shards" in results["batch_error"]
