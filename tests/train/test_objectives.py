"""Span corruption: fixed shapes, sentinel bookkeeping, and an exact round trip."""

import numpy as np
import pytest

from train.objectives import SpanCorruption


def test_corrupt_then_reconstruct_gives_the_window_back():
    objective = SpanCorruption(window=64, sentinel_start=1000, decoder_start_id=999)
    rng = np.random.default_rng(0)
    for _ in range(50):
        window = rng.integers(0, 1000, 64)
        example = objective.corrupt(window, rng)
        assert example["inputs"].shape == (objective.input_length,)
        assert example["targets"].shape == (objective.target_length,)
        np.testing.assert_array_equal(
            objective.reconstruct(example["inputs"], example["targets"]), window
        )
        # Teacher forcing: the decoder sees the start token, then the targets shifted right.
        assert example["decoder_inputs"][0] == 999
        np.testing.assert_array_equal(example["decoder_inputs"][1:], example["targets"][:-1])


def test_sentinels_pair_up_in_order():
    objective = SpanCorruption(
        window=40, sentinel_start=500, decoder_start_id=0, noise_density=0.3, mean_span_length=2.0
    )
    example = objective.corrupt(np.arange(40), np.random.default_rng(1))
    sentinels = list(range(500, 500 + objective.num_spans))
    assert [t for t in example["inputs"] if t >= 500] == sentinels
    assert [t for t in example["targets"] if t >= 500] == sentinels
    assert example["targets"][0] == 500  # the target starts with the first span's sentinel
    noise = objective.noise_mask(np.random.default_rng(1))
    assert noise.sum() == objective.num_noise == 12
    assert not noise[0]  # a kept span comes first


def test_hand_computed_example():
    objective = SpanCorruption(
        window=10, sentinel_start=100, decoder_start_id=0, noise_density=0.3, mean_span_length=1.5
    )

    class FixedLayout:
        """An rng whose choice() yields the cut points that give a known layout."""

        def __init__(self):
            self.cuts = iter([np.array([3]), np.array([1])])

        def choice(self, *args, **kwargs):
            return next(self.cuts)

    # keep lengths (3, 4), noise lengths (1, 2): K K K N K K K K N N
    example = objective.corrupt(np.arange(10, 20), FixedLayout())
    assert example["inputs"].tolist() == [10, 11, 12, 100, 14, 15, 16, 17, 101]
    assert example["targets"].tolist() == [100, 13, 101, 18, 19]


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="noise_density"):
        SpanCorruption(window=10, sentinel_start=1, decoder_start_id=0, noise_density=1.5)
    with pytest.raises(ValueError, match="too short"):
        SpanCorruption(
            window=3, sentinel_start=1, decoder_start_id=0, noise_density=0.6, mean_span_length=1.0
        )
    objective = SpanCorruption(window=10, sentinel_start=1, decoder_start_id=0)
    with pytest.raises(ValueError, match="window of 10"):
        objective.corrupt(np.arange(11), np.random.default_rng(0))


def test_blank_infilling_layout_round_trip_and_2d_positions():
    from train.objectives import BlankInfilling

    objective = BlankInfilling(window=48, mask_id=100, start_id=101, end_id=102)
    rng = np.random.default_rng(0)
    for _ in range(30):
        window = rng.integers(0, 100, 48)
        example = objective.corrupt(window, rng)
        n = int(example["prefix_len"])
        assert n == objective.prefix_length
        assert all(v.shape == (objective.length,) for k, v in example.items() if k != "prefix_len")
        np.testing.assert_array_equal(objective.reconstruct(example), window)
        # Loss only on part B: each span's tokens and its [E]; [S] begins each span's inputs.
        assert not example["weights"][:n].any() and example["weights"][n:].all()
        inputs, targets = example["inputs"], example["targets"]
        assert (inputs[n:] == 101).sum() == (targets[n:] == 102).sum() == objective.num_spans
        # Part A: positions 0..n-1, block position 0. Part B: its [MASK]'s position, 1, 2, ...
        np.testing.assert_array_equal(example["positions"][:n], np.arange(n))
        assert not example["block_positions"][:n].any()
        for i in np.flatnonzero(inputs == 101):
            assert inputs[example["positions"][i]] == 100
            assert example["block_positions"][i] == 1
        # Within part B, the targets are the next inputs except at span ends.
        for i in range(n, objective.length - 1):
            if inputs[i + 1] != 101:
                assert targets[i] == inputs[i + 1]
