"""Train / valid / test splits from a ratio string such as ``"949,50,1"`` (Megatron's rounding)."""

from __future__ import annotations

import re

import numpy as np

__all__ = ["parse_split", "split_ranges", "split_documents"]

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str | list[float] | tuple[float, ...]) -> list[float]:
    """Three normalised weights from ``"949,50,1"``, ``"98/2/0"``, ``"1"`` or a sequence of numbers.

    Missing parts are 0 (``"90,10"`` -> train 0.9, valid 0.1, test 0). Raises ValueError for more than
    three parts, a negative or non-numeric part, or weights summing to 0.
    """
    fn = "megacore.data.parse_split"
    if isinstance(split, str):
        parts = [p for p in re.split(r"[,/]", split.strip())]
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"{fn}: split {split!r} is not a list of numbers such as '949,50,1'") from None
    else:
        weights = [float(w) for w in split]
    if not 1 <= len(weights) <= 3:
        raise ValueError(f"{fn}: split {split!r} must have 1 to 3 parts (train, valid, test), got {len(weights)}")
    if any(not np.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"{fn}: split {split!r} has a negative or non-finite part")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"{fn}: split {split!r} sums to 0")
    return [w / total for w in weights]


def split_ranges(split, num_documents: int) -> list[tuple[int, int]]:
    """[(begin, end)] document ranges of train, valid and test: contiguous, in order, covering [0, n).

    Megatron's rounding: each boundary adds round(weight * n) to the previous one, then all boundaries
    shift by the same amount so the last lands on n. (Megatron would let a boundary go negative when the
    first parts round to 0 and the total overshoots; we clamp to [0, n], keeping them ordered.)
    """
    if num_documents < 0:
        raise ValueError(f"megacore.data.split_ranges: num_documents must be >= 0, got {num_documents}")
    weights = parse_split(split)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w * float(num_documents))))
    excess = bounds[-1] - num_documents
    bounds = [0] + [min(max(b - excess, 0), num_documents) for b in bounds[1:]]
    for i in range(1, len(bounds)):
        bounds[i] = max(bounds[i], bounds[i - 1])
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def split_documents(split, num_documents: int) -> list[np.ndarray]:
    """Document ids (int64 [k]) of train, valid and test, per :func:`split_ranges`."""
    return [np.arange(b, e, dtype=np.int64) for b, e in split_ranges(split, num_documents)]
