"""BlendedDataset and the C++ blending-index builders (against megacore.data.index_reference)."""

from __future__ import annotations

import numpy as np
import pytest

from megacore import _C
from megacore.data import BlendedDataset, blending_sample_counts
from megacore.data import index_reference as ref


def random_weights(rng, num_datasets):
    return rng.random(num_datasets) + 0.001


def test_blending_indices_match_reference_over_random_weights_and_sizes():
    for seed in range(200):
        rng = np.random.default_rng(seed)
        weights = random_weights(rng, int(rng.integers(1, 10)))
        size = int(rng.integers(0, 600))
        got = _C.build_blending_indices(weights, size)
        want = ref.build_blending_indices(weights, size)
        assert got[0].dtype == np.int16 and got[1].dtype == np.int64
        np.testing.assert_array_equal(got[0], want[0], err_msg=f"seed {seed}")
        np.testing.assert_array_equal(got[1], want[1], err_msg=f"seed {seed}")


def test_blend_follows_the_weights_at_every_prefix():
    # Megatron's rule (max error at max(i, 1)) keeps every dataset's count within 1.5 samples of
    # weight * n after any n samples, and the final counts within one sample of the rounded target.
    for seed in range(200):
        rng = np.random.default_rng(seed)
        num_datasets = int(rng.integers(1, 8))
        weights = random_weights(rng, num_datasets)
        weights /= weights.sum()
        size = int(rng.integers(1, 2000))
        dataset_index, _ = _C.build_blending_indices(weights, size)
        counts = np.zeros((size, num_datasets))
        counts[np.arange(size), dataset_index] = 1
        counts = np.cumsum(counts, axis=0)  # [size, datasets]: counts after each prefix
        target = weights[None, :] * np.arange(1, size + 1)[:, None]
        assert np.abs(counts - target).max() < 1.5, seed
        assert np.abs(counts[-1] - np.round(target[-1])).max() <= 1, seed


def test_blend_of_round_weights_is_exact():
    dataset_index, sample_index = _C.build_blending_indices(np.array([0.5, 0.3, 0.2]), 1000)
    assert np.bincount(dataset_index).tolist() == [500, 300, 200]
    dataset_index, _ = _C.build_blending_indices(np.array([3.0, 1.0]), 8)  # weights are normalised
    assert np.bincount(dataset_index).tolist() == [6, 2]


def test_dataset_sample_index_counts_each_datasets_samples_in_order():
    rng = np.random.default_rng(0)
    dataset_index, sample_index = _C.build_blending_indices(random_weights(rng, 5), 3000)
    for d in range(5):
        picked = sample_index[dataset_index == d]
        np.testing.assert_array_equal(picked, np.arange(len(picked)))


def test_exhaustive_blending_uses_every_sample_exactly_once_and_matches_reference():
    for seed in range(100):
        rng = np.random.default_rng(seed)
        sizes = rng.integers(0, 60, int(rng.integers(1, 8)))
        sizes[0] += 1
        got = _C.build_exhaustive_blending_indices(sizes)
        want = ref.build_exhaustive_blending_indices(sizes)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        assert np.bincount(got[0], minlength=len(sizes)).tolist() == sizes.tolist()
        for d in range(len(sizes)):
            np.testing.assert_array_equal(got[1][got[0] == d], np.arange(sizes[d]))


@pytest.mark.parametrize(
    "weights, size, message",
    [
        ([1.0, 0.0], 10, r"weights\[1\] = 0"),
        ([1.0, -2.0], 10, r"weights\[1\] = -2"),
        ([1.0, float("nan")], 10, r"weights\[1\] = nan"),
        ([], 10, "need 1 to 32767 datasets"),
        ([1.0], -1, "size must be >= 0"),
    ],
)
def test_bad_blending_arguments_are_value_errors(weights, size, message):
    for builder in (_C.build_blending_indices, ref.build_blending_indices):
        with pytest.raises(ValueError, match=message):
            builder(np.array(weights, dtype=np.float64), size)


def test_bad_exhaustive_sizes_are_value_errors():
    for builder in (_C.build_exhaustive_blending_indices, ref.build_exhaustive_blending_indices):
        with pytest.raises(ValueError, match="negative"):
            builder(np.array([3, -1]))
        with pytest.raises(ValueError, match="sum to 0"):
            builder(np.array([0, 0]))
    with pytest.raises(ValueError, match="need 1 to 32767 datasets"):
        _C.build_blending_indices(np.ones(40_000), 1)


class Items:
    """A map-style dataset of dict items {"value": (name, i)}."""

    def __init__(self, name, n):
        self.name, self.n = name, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return {"value": (self.name, i)}


def test_blended_dataset_returns_the_chosen_datasets_items_with_dataset_id():
    weights = [0.6, 0.3, 0.1]
    counts = blending_sample_counts(weights, 500)
    assert counts == [300, 150, 50]
    datasets = [Items(name, n) for name, n in zip("abc", counts)]
    blend = BlendedDataset(datasets, weights, 500)
    assert len(blend) == 500
    seen = {name: [] for name in "abc"}
    for i in range(len(blend)):
        item = blend[i]
        name, j = item["value"]
        assert item["dataset_id"] == "abc".index(name)
        seen[name].append(j)
    assert all(seen[name] == list(range(n)) for name, n in zip("abc", counts))  # each in order, each once


def test_blended_dataset_rejects_datasets_smaller_than_their_share():
    with pytest.raises(ValueError, match="dataset 1 has 10 samples but the blend takes 50"):
        BlendedDataset([Items("a", 100), Items("b", 10)], [0.5, 0.5], 100)
    with pytest.raises(ValueError, match="2 weights for 3 datasets"):
        BlendedDataset([Items("a", 1), Items("b", 1), Items("c", 1)], [1, 1], 2)
    with pytest.raises(ValueError, match="give size"):
        BlendedDataset([Items("a", 1)], [1.0])


def test_blended_dataset_without_weights_takes_every_sample_once():
    blend = BlendedDataset([Items("a", 30), Items("b", 10)])
    assert len(blend) == 40
    values = sorted(blend[i]["value"] for i in range(40))
    assert values == sorted([("a", i) for i in range(30)] + [("b", i) for i in range(10)])
    # Interleaved in proportion, not concatenated: b's samples are spread over the whole blend.
    b_positions = [i for i in range(40) if blend[i]["value"][0] == "b"]
    assert b_positions[0] < 8 and b_positions[-1] > 32
