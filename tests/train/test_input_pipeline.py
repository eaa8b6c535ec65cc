"""Tests for train/input_pipeline.py: packing, shuffling, sharding, resuming, build_datasets."""

import json

import ml_collections
import numpy as np
import pytest

from train import input_pipeline, tokenizers


def _row_ids(num_rows: int, seq_len: int = 4) -> np.ndarray:
    """Packed rows whose every token is the row's index, so a batch tells which rows it holds."""
    return np.repeat(np.arange(num_rows, dtype=np.int32)[:, None], seq_len + 1, axis=1)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _rows_of(batches):
    return [int(r) for b in batches for r in b["inputs"][:, 0]]


def test_pack_documents_shapes_eos_and_shift():
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33]]
    packed = input_pipeline.pack_documents(docs, seq_len=3, eos_id=1)
    # 3+1 + 2+1 + 4+1 = 12 tokens -> 3 windows of 4.
    assert packed.dtype == np.int32 and packed.shape == (3, 4)
    np.testing.assert_array_equal(packed.ravel(), [10, 11, 12, 1, 20, 21, 1, 30, 31, 32, 33, 1])
    example = input_pipeline._to_example(packed)
    np.testing.assert_array_equal(example["inputs"][:, 1:], example["targets"][:, :-1])
    no_eos = input_pipeline.pack_documents(docs, seq_len=4, eos_id=None)
    assert no_eos.shape == (1, 5)  # 9 tokens: one window, the rest dropped.
    with pytest.raises(ValueError, match="do not fill one sequence"):
        input_pipeline.pack_documents([[1, 2]], seq_len=8, eos_id=None)


def test_batches_have_keys_shapes_and_dtypes():
    ds = input_pipeline.make_train_dataset(_row_ids(10, seq_len=6), batch_size=4, seed=0)
    batch = next(iter(ds))
    assert sorted(batch) == ["inputs", "targets"]
    for value in batch.values():
        assert value.dtype == np.int32 and value.shape == (4, 6)


def test_same_seed_same_batches_other_seed_other_batches():
    packed = _row_ids(64)

    def first_rows(seed):
        ds = input_pipeline.make_train_dataset(packed, batch_size=8, seed=seed)
        return _rows_of(_take(iter(ds), 6))

    assert first_rows(1) == first_rows(1)
    assert first_rows(1) != first_rows(2)


def test_each_epoch_is_a_fresh_permutation():
    ds = input_pipeline.make_train_dataset(_row_ids(8), batch_size=2, seed=3)
    rows = _rows_of(_take(iter(ds), 8))
    epoch1, epoch2 = rows[:8], rows[8:]
    assert sorted(epoch1) == sorted(epoch2) == list(range(8))
    assert epoch1 != epoch2 and epoch1 != list(range(8))


def test_process_shards_are_disjoint_and_cover_everything():
    packed, process_count, batch_size = _row_ids(30), 3, 6
    seen = []
    for index in range(process_count):
        ds = input_pipeline.make_train_dataset(
            packed, batch_size, seed=0, process_index=index, process_count=process_count
        )
        batches = _take(iter(ds), 5)  # 10 rows per process, 2 per batch: one epoch.
        assert batches[0]["inputs"].shape[0] == batch_size // process_count
        seen.append(set(_rows_of(batches)))
    assert sum(len(s) for s in seen) == 30 and set().union(*seen) == set(range(30))


def test_global_batch_must_divide_by_process_count():
    with pytest.raises(
        ValueError, match="batch_size=10 is not a positive multiple of process_count=4"
    ):
        input_pipeline.make_train_dataset(_row_ids(40), 10, seed=0, process_count=4)


def test_resume_yields_exactly_the_next_batches():
    ds = input_pipeline.make_train_dataset(_row_ids(20), batch_size=3, seed=7)
    iterator = iter(ds)
    _take(iterator, 7)
    state = json.dumps(iterator.get_state())  # what the checkpoint stores (orbax JsonSave)
    assert isinstance(json.loads(state), dict)
    expected = _take(iterator, 5)
    # A restarted run rebuilds the dataset from the same arguments, then restores.
    rebuilt = input_pipeline.make_train_dataset(_row_ids(20), batch_size=3, seed=7)
    restored = iter(rebuilt)
    restored.set_state(json.loads(state))
    resumed = _take(restored, 5)
    for want, got in zip(expected, resumed, strict=True):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_eval_batches_in_order_and_sharded_evenly():
    packed = _row_ids(11)
    batches = input_pipeline.make_eval_batches(packed, batch_size=4, max_batches=None)
    assert _rows_of(batches) == list(range(8))  # In order; the partial batch dropped.
    assert len(input_pipeline.make_eval_batches(packed, 4, max_batches=1)) == 1
    shards = [input_pipeline.make_eval_batches(packed, 4, 0, i, 2) for i in range(2)]
    assert [len(s) for s in shards] == [2, 2]  # Rows 6 and 5 per process: equal batch counts.
    assert not set(_rows_of(shards[0])) & set(_rows_of(shards[1]))
    with pytest.raises(ValueError, match="do not fill one batch of 16"):
        input_pipeline.make_eval_batches(packed, batch_size=16)


def _config(source, **overrides):
    config = ml_collections.ConfigDict(
        dict(
            source=source,
            val_names=None,
            tokenizer="char",
            vocab_size=512,
            seq_len=32,
            batch_size=4,
            seed=0,
            eval_batches=0,
        )
    )
    config.update(overrides)
    return config


def test_build_datasets_saves_then_reuses_tokenizer(tmp_path, monkeypatch):
    source = tmp_path / "texts"
    source.mkdir()
    for i in range(10):
        (source / f"doc{i}.txt").write_text(f"Document {i} says hello, world.\n" * 20)
    workdir = tmp_path / "run"
    bundle = input_pipeline.build_datasets(_config(str(source)), workdir)
    assert (workdir / "tokenizer" / tokenizers.MANIFEST).exists()
    batch = next(iter(bundle.train_ds))
    assert batch["inputs"].shape == (4, 32) and bundle.eval_batches
    assert bundle.num_train_tokens == 9 * len((source / "doc0.txt").read_text())

    def no_training(*args, **kwargs):
        raise AssertionError("a resumed run must load the saved tokenizer")

    monkeypatch.setattr(tokenizers, "build_tokenizer", no_training)
    resumed = input_pipeline.build_datasets(_config(str(source)), workdir)
    assert resumed.tokenizer.encode("hello") == bundle.tokenizer.encode("hello")
    with pytest.raises(ValueError, match="holds a 'char' tokenizer.*asks for 'byte'"):
        input_pipeline.build_datasets(_config(str(source), tokenizer="byte"), workdir)


@pytest.mark.data
def test_build_datasets_on_shakespeare(shakespeare_corpus, tmp_path):
    config = _config("shakespeare", tokenizer="sentencepiece_bpe", seq_len=128, batch_size=8)
    config.eval_batches = 3
    bundle = input_pipeline.build_datasets(config, tmp_path)
    assert bundle.tokenizer.vocab_size == 512 and len(bundle.eval_batches) == 3
    fraction = bundle.num_val_tokens / (bundle.num_train_tokens + bundle.num_val_tokens)
    assert 0.08 < fraction < 0.12
    batch = next(iter(bundle.train_ds))
    assert batch["targets"].shape == (8, 128)
    assert bundle.tokenizer.decode(batch["inputs"][0])  # Real text comes back out.


def test_span_corruption_batches_reconstruct_resume_and_change_per_epoch():
    from train.objectives import SpanCorruption

    windows = np.arange(10 * 32, dtype=np.int32).reshape(10, 32) % 50
    span = SpanCorruption(window=32, sentinel_start=50)
    ds = input_pipeline.make_train_dataset(windows, batch_size=5, seed=3, span_corruption=span)
    iterator = iter(ds)
    first_epoch = _take(iterator, 2)
    batch = first_epoch[0]
    assert batch["inputs"].shape == (5, span.input_length)
    assert batch["targets"].shape == batch["decoder_inputs"].shape == (5, span.target_length)
    originals = {tuple(row) for row in windows}
    for inputs, targets in zip(batch["inputs"], batch["targets"], strict=True):
        assert tuple(span.reconstruct(inputs, targets)) in originals
    state = iterator.get_state()
    expected = _take(iterator, 3)
    restored = iter(
        input_pipeline.make_train_dataset(windows, batch_size=5, seed=3, span_corruption=span)
    )
    restored.set_state(state)
    for want, got in zip(expected, _take(restored, 3), strict=True):
        np.testing.assert_array_equal(want["inputs"], got["inputs"])
    # The same window gets a different span layout in a later epoch.
    layouts = {}
    for batch in first_epoch + expected:
        for inputs, targets in zip(batch["inputs"], batch["targets"], strict=True):
            key = tuple(span.reconstruct(inputs, targets))
            layouts.setdefault(key, set()).add(tuple(inputs))
    assert any(len(v) > 1 for v in layouts.values())
