"""BlendedDataset: several datasets mixed by weight, with exact proportions (Megatron's BlendedDataset).

The blending indices come from ``megacore._C.build_blending_indices`` (Megatron's greedy assignment):
global sample i goes to the dataset whose count lags its weight the most, so the mix is even throughout, not
only overall: after any n samples every dataset's count is within 1.5 of its share of n (the greedy rule
overshoots by up to ~1.3 at some prefixes; tests/data/test_blended.py), and the final counts are within one
sample of weight * size.
"""

from __future__ import annotations

import numpy as np

from megacore import _C

__all__ = ["BlendedDataset", "blending_sample_counts"]


def _normalized_weights(fn: str, weights, num_datasets: int) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(weights) != num_datasets:
        raise ValueError(f"{fn}: {len(weights)} weights for {num_datasets} datasets")
    if not np.all(np.isfinite(weights)) or np.any(weights <= 0):
        raise ValueError(f"{fn}: weights must be finite and > 0, got {weights.tolist()}")
    return weights / weights.sum()


def blending_sample_counts(weights, size: int) -> list[int]:
    """Samples each dataset contributes to a blend of ``size``: build each dataset with (at least) these.

    Exact (from the same index builder BlendedDataset uses), so no safety margin is needed; each is
    within one sample of weight * size.
    """
    weights = _normalized_weights("megacore.data.blending_sample_counts", weights, len(np.atleast_1d(weights)))
    dataset_index, _ = _C.build_blending_indices(weights, int(size))
    return np.bincount(dataset_index, minlength=len(weights)).tolist()


class BlendedDataset:
    """Mixes ``datasets`` by ``weights`` into ``size`` samples.

    Args:
        datasets: map-style datasets (``len`` and ``__getitem__``), e.g. GPTDatasets.
        weights: one positive number per dataset, normalised by their sum. None: exhaustive blending, every
            sample of every dataset once, interleaved in proportion to their lengths (``size`` is then their
            total).
        size: number of samples of the blend (required with weights).

    ``ds[i]`` is the item of the chosen dataset (a dict gets ``"dataset_id"`` added, an int64 scalar array;
    anything else comes back as ``(dataset_id, item)``). ``dataset_index`` (int16 [size]) and
    ``dataset_sample_index`` (int64 [size]) say which dataset and which of its samples each index is.
    Raises ValueError when a dataset has fewer samples than its share (see :func:`blending_sample_counts`).
    """

    def __init__(self, datasets, weights=None, size: int | None = None):
        fn = "megacore.data.BlendedDataset"
        self.datasets = list(datasets)
        if not self.datasets:
            raise ValueError(f"{fn}: no datasets given")
        lengths = [len(d) for d in self.datasets]
        if weights is None:
            if size is not None and size != sum(lengths):
                raise ValueError(f"{fn}: without weights the blend has every sample ({sum(lengths)}), got size {size}")
            self.weights = np.asarray(lengths, dtype=np.float64) / max(sum(lengths), 1)
            self.dataset_index, self.dataset_sample_index = _C.build_exhaustive_blending_indices(
                np.asarray(lengths, dtype=np.int64))
        else:
            if size is None or int(size) < 0:
                raise ValueError(f"{fn}: give size (>= 0) with weights, got {size}")
            self.weights = _normalized_weights(fn, weights, len(self.datasets))
            self.dataset_index, self.dataset_sample_index = _C.build_blending_indices(self.weights, int(size))
        counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, (need, have) in enumerate(zip(counts, lengths)):
            if need > have:
                raise ValueError(f"{fn}: dataset {d} has {have} samples but the blend takes {need} of it; build it "
                                 f"with num_samples >= blending_sample_counts(weights, size)[{d}]")
        self.sample_counts = counts.tolist()

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, idx: int):
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"megacore.data.BlendedDataset: sample {idx} out of range for {n} samples")
        d = int(self.dataset_index[idx])
        item = self.datasets[d][int(self.dataset_sample_index[idx])]
        if isinstance(item, dict):
            return {**item, "dataset_id": np.int64(d)}
        return d, item

    def __repr__(self) -> str:
        weights = ", ".join(f"{w:.3g}" for w in self.weights)
        return f"BlendedDataset({len(self)} samples from {len(self.datasets)} datasets, weights [{weights}])"
