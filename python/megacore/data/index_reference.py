"""Pure-Python reference implementations of the dataset index builders in megacore._C.

Same signatures and results as the C++ builders (cpp/data/helpers.cpp); used by the tests (which
compare the two over random inputs) and by benchmarks/prepare.py (which times both). Slow on purpose:
plain Python loops, no numpy tricks, so the semantics are easy to read.

`build_sample_index` is written from a different angle than the C++ walk: sample k starts at token
k * seq_length of the concatenated document stream, so it locates that token in the stream instead of
consuming documents seq_length tokens at a time. The two agreeing is the test that both are right.
"""

from __future__ import annotations

import numpy as np

__all__ = ["build_sample_index", "build_blending_indices", "build_exhaustive_blending_indices"]


def build_sample_index(
    sizes,
    document_index,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: int = 1,
) -> np.ndarray:
    """GPT sample index: int64 [num_samples + 1, 2] of (position in document_index, token offset).

    sizes: integer [num_documents_total], document d has sizes[d] tokens; document_index: integer [n], the
    (shuffled, repeated per epoch) documents in stream order. Row k says where sample k starts; row
    num_samples says where the last one ends. Raises ValueError on the same bad inputs as the C++ builder.
    """
    fn = "megacore.data.build_sample_index"
    sizes = [int(s) for s in np.asarray(sizes).reshape(-1)]
    document_index = [int(d) for d in np.asarray(document_index).reshape(-1)]
    extra = int(add_extra_token_to_sequence)
    if seq_length < 1:
        raise ValueError(f"{fn}: seq_length must be >= 1, got {seq_length}")
    if extra not in (0, 1):
        raise ValueError(f"{fn}: add_extra_token_to_sequence must be 0 or 1, got {extra}")
    if num_epochs < 1:
        raise ValueError(f"{fn}: num_epochs must be >= 1, got {num_epochs}")
    # cumulative[i] = first stream token of document_index[i]
    cumulative = [0]
    for i, d in enumerate(document_index):
        if not 0 <= d < len(sizes):
            raise ValueError(f"{fn}: document_index[{i}] = {d} is outside the {len(sizes)} document sizes")
        if sizes[d] < 0:
            raise ValueError(f"{fn}: sizes[{d}] = {sizes[d]} is negative")
        cumulative.append(cumulative[-1] + sizes[d])
    total = cumulative[-1]
    if tokens_per_epoch * num_epochs != total:
        raise ValueError(
            f"{fn}: num_epochs ({num_epochs}) * tokens_per_epoch ({tokens_per_epoch}) must equal the tokens "
            f"of the document index ({total})"
        )
    usable = total - extra
    if usable <= 0:
        num_samples = 0
    elif drop_last_partial_sequence:
        num_samples = usable // seq_length
    else:
        num_samples = -(-usable // seq_length)

    rows = [(0, 0)]
    position = 0
    for k in range(1, num_samples + 1):
        # The last token sample k-1 takes is stream token k*seq_length + extra - 1; sample k starts in the
        # document holding it (with extra=1 that token is shared: label of k-1, input of k).
        last = k * seq_length + extra - 1
        if last >= total:  # the final, partial sample: it runs to the end of the stream
            rows.append((len(document_index) - 1, sizes[document_index[-1]] - extra))
            continue
        while cumulative[position + 1] <= last:  # skips empty documents too
            position += 1
        rows.append((position, last - cumulative[position] + 1 - extra))
    return np.array(rows, dtype=np.int64).reshape(num_samples + 1, 2)


def _check_count(fn: str, num_datasets: int) -> None:
    if not 1 <= num_datasets <= 32767:
        raise ValueError(f"{fn}: need 1 to 32767 datasets (int16 dataset index), got {num_datasets}")


def build_blending_indices(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16 [size], dataset_sample_index int64 [size]).

    Greedy error-minimising assignment (Megatron's): global sample i goes to the dataset d maximising
    w[d] * max(i, 1) - count[d] (ties to the lowest d), w = weights / sum(weights); dataset_sample_index is
    that dataset's running count. Raises ValueError for non-positive or non-finite weights.
    """
    fn = "megacore.data.build_blending_indices"
    weights = [float(w) for w in np.asarray(weights, dtype=np.float64).reshape(-1)]
    _check_count(fn, len(weights))
    if size < 0:
        raise ValueError(f"{fn}: size must be >= 0, got {size}")
    for i, w in enumerate(weights):
        if not (np.isfinite(w) and w > 0):
            raise ValueError(f"{fn}: weights[{i}] = {w}; every weight must be finite and > 0 (leave unused datasets out)")
    total = 0.0
    for w in weights:
        total += w
    weights = [w / total for w in weights]
    counts = [0] * len(weights)
    dataset_index = np.empty(size, dtype=np.int16)
    dataset_sample_index = np.empty(size, dtype=np.int64)
    for i in range(size):
        n = max(float(i), 1.0)
        best, best_error = 0, weights[0] * n - counts[0]
        for d in range(1, len(weights)):
            error = weights[d] * n - counts[d]
            if error > best_error:
                best, best_error = d, error
        dataset_index[i] = best
        dataset_sample_index[i] = counts[best]
        counts[best] += 1
    return dataset_index, dataset_sample_index


def build_exhaustive_blending_indices(sizes) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16 [sum(sizes)], dataset_sample_index int64 [sum(sizes)]).

    Every dataset i appears exactly sizes[i] times; the same greedy rule with weights sizes / sum(sizes),
    over the datasets not yet spent. Raises ValueError for negative sizes or an all-zero total.
    """
    fn = "megacore.data.build_exhaustive_blending_indices"
    sizes = [int(s) for s in np.asarray(sizes).reshape(-1)]
    _check_count(fn, len(sizes))
    for i, s in enumerate(sizes):
        if s < 0:
            raise ValueError(f"{fn}: sizes[{i}] = {s} is negative")
    total = sum(sizes)
    if total == 0:
        raise ValueError(f"{fn}: sizes sum to 0")
    weights = [s / total for s in sizes]
    counts = [0] * len(sizes)
    unspent = [d for d in range(len(sizes)) if sizes[d] > 0]
    dataset_index = np.empty(total, dtype=np.int16)
    dataset_sample_index = np.empty(total, dtype=np.int64)
    i = 0
    while unspent:
        n = max(float(i), 1.0)
        best, best_error = -1, -np.inf
        for d in unspent:
            error = weights[d] * n - counts[d]
            if error > best_error:
                best, best_error = d, error
        dataset_index[i] = best
        dataset_sample_index[i] = counts[best]
        counts[best] += 1
        if counts[best] == sizes[best]:
            unspent.remove(best)
        i += 1
    return dataset_index, dataset_sample_index
