"""`python -m train` on 8 (fake CPU) devices shards the run by config.parallel and trains the
same model as on one device: equal losses, and a resumed sharded run continues identically."""

from __future__ import annotations

import pytest
from training_run import train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    lines = [f"Line {i}: to be or not to be, that is the question {i % 7}." for i in range(400)]
    path.write_text("\n".join(lines))
    return str(path)


@pytest.mark.slow
def test_fsdp_tp_run_matches_one_device_and_resumes(corpus, tmp_path):
    common = ["train.num_steps=6", "train.checkpoint_every=3", "data.batch_size=8"]
    common += [f"data.source={corpus}", "train.sample_tokens=0", "optimizer.decay_steps=6"]
    single = train(tmp_path / "one", 1, *common)
    sharded_args = [*common, "parallel.rules=fsdp_tp", "parallel.mesh.data=1"]
    sharded_args += ["parallel.mesh.fsdp=-1", "parallel.mesh.tensor=2"]
    sharded = train(tmp_path / "eight", 8, *sharded_args)
    assert (single["devices"], sharded["devices"]) == (1, 8)
    for step, loss in single["losses"].items():
        assert sharded["losses"][step] == pytest.approx(loss, rel=1e-4)
    assert sharded["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)

    # Stop after 3 steps, resume on the mesh: the same losses as the straight run.
    train(tmp_path / "resumed", 8, *sharded_args, "train.num_steps=3")
    resumed = train(tmp_path / "resumed", 8, *sharded_args)
    assert resumed["val_loss"] == pytest.approx(sharded["val_loss"], rel=1e-5)


@pytest.mark.slow
def test_pipelined_run_matches_one_device(corpus, tmp_path):
    common = ["train.num_steps=3", "data.batch_size=8", f"data.source={corpus}"]
    common += ["train.sample_tokens=0", "optimizer.decay_steps=3", "model.num_layers=4"]
    single = train(tmp_path / "one", 1, *common)
    piped = train(
        tmp_path / "pp", 8, *common, "parallel.rules=pp_dp_tp", "parallel.mesh.pipeline=2",
        "parallel.mesh.data=-1", "parallel.mesh.tensor=2", "parallel.pipeline_microbatches=4",
    )  # fmt: skip
    for step, loss in single["losses"].items():
        assert piped["losses"][step] == pytest.approx(loss, rel=1e-4)
    assert piped["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)


def test_batch_that_does_not_split_over_the_mesh_is_refused_before_training(corpus, tmp_path):
    # With one process the trainer hands host batches to the sharded step, so it checks the
    # batch size against the mesh up front, with the same message as parallel.train.shard_batch.
    with pytest.raises(
        pytest.fail.Exception, match="global batch size 6 is not divisible by the 8"
    ):
        # (evaluation batches of 8 split fine: only the training batch is at fault)
        train(tmp_path / "bad", 8, f"data.source={corpus}", "data.batch_size=6",
              "data.eval_batch_size=8")  # fmt: skip
