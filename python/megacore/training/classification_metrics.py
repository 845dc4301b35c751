"""Metrics of fine-tuned classifiers, written out (no scikit-learn or scipy needed) with the conventions of the
libraries GLUE's numbers come from.

* :func:`classification_metrics`: accuracy, macro-F1 and, for two classes, Matthews' correlation. Positions labelled
  -100 (padding, special tokens, a word's later pieces) are left out, predictions there included. Macro-F1 is
  scikit-learn's ``f1_score(average="macro", zero_division=0)``: the mean of the per-class F1 over the classes
  that occur in the labels or the predictions, a class's F1 being 0 where its precision or recall is undefined.
  The Matthews correlation is scikit-learn's ``matthews_corrcoef`` (GLUE's CoLA metric), class 1 the positive one,
  0 where it is undefined (only one class among the labels or among the predictions).
* :func:`regression_metrics`: mean squared error, Pearson's and Spearman's correlations (GLUE's STS-B metrics;
  Spearman's is Pearson's of the ranks, tied values sharing their average rank, as scipy's ``spearmanr``). A
  correlation with a constant side is undefined (scipy says nan): it is 0 here, the convention of the
  Matthews correlation, so that a logged metric is always a number.

Inputs are integer class ids (predictions: the argmax of the logits) or numbers, as Python sequences, numpy arrays
or torch tensors of any shape (flattened; both arguments of the same shape). Empty inputs (or nothing left once
-100 is dropped) are a ValueError, as are ids out of range and non-finite numbers.
"""

from __future__ import annotations

import math

import numpy as np

from megacore.training.trainer import IGNORE_INDEX

__all__ = ["classification_metrics", "regression_metrics"]


def _array(values, name: str, fn: str) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, on any device
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.dtype == object:
        raise ValueError(f"megacore.training.{fn}: {name} must be numbers, got {type(values).__name__} of objects")
    return array


def _same_shape(a: np.ndarray, b: np.ndarray, names: tuple[str, str], fn: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"megacore.training.{fn}: {names[0]} has shape {list(a.shape)}, {names[1]} "
                         f"{list(b.shape)}; expected the same shape")


def classification_metrics(predictions, labels, num_labels: int) -> dict:
    """``{"accuracy", "macro_f1"}`` and, when ``num_labels == 2``, ``"mcc"`` (module docstring: the conventions),
    as Python floats.

    Args:
        predictions: predicted class ids, integers in ``[0, num_labels)``, any shape.
        labels: the true class ids, the same shape; -100 where nothing is to be counted.
        num_labels: the number of classes.

    Raises ValueError for integer ids out of range, non-integer inputs, different shapes, ``num_labels`` < 1, and
    for nothing to count (empty, or every label -100).
    """
    fn = "classification_metrics"
    if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or num_labels < 1:
        raise ValueError(f"megacore.training.{fn}: num_labels={num_labels!r} must be a positive int")
    predictions, labels = _array(predictions, "predictions", fn), _array(labels, "labels", fn)
    _same_shape(predictions, labels, ("predictions", "labels"), fn)
    for name, array in (("predictions", predictions), ("labels", labels)):
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"megacore.training.{fn}: {name} must be integer class ids, got dtype {array.dtype} "
                             "(predictions: the argmax of the logits)")
    predictions, labels = predictions.reshape(-1).astype(np.int64), labels.reshape(-1).astype(np.int64)
    counted = labels != IGNORE_INDEX
    predictions, labels = predictions[counted], labels[counted]
    if labels.size == 0:
        raise ValueError(f"megacore.training.{fn}: nothing to count (no labels, or all of them {IGNORE_INDEX})")
    for name, array in (("labels", labels), ("predictions", predictions)):
        bad = (array < 0) | (array >= num_labels)
        if bad.any():
            raise ValueError(f"megacore.training.{fn}: {name} holds {int(array[bad][0])}, outside [0, {num_labels})"
                             f"{f' (and {IGNORE_INDEX} to ignore)' if name == 'labels' else ''}")
    # confusion[i, j]: how many of class i were predicted j
    confusion = np.bincount(labels * num_labels + predictions, minlength=num_labels * num_labels)
    confusion = confusion.reshape(num_labels, num_labels).astype(np.float64)
    true_positives = np.diag(confusion)
    predicted, actual = confusion.sum(0), confusion.sum(1)
    present = (predicted + actual) > 0  # classes in the labels or the predictions
    # F1 = 2 tp / (2 tp + fp + fn): 0 where precision or recall is undefined (tp = 0), as zero_division=0
    f1 = 2 * true_positives[present] / (predicted[present] + actual[present])
    result = {"accuracy": float(true_positives.sum() / labels.size), "macro_f1": float(f1.mean())}
    if num_labels == 2:
        (tn, fp), (fn_, tp) = confusion
        denominator = math.sqrt((tp + fp) * (tp + fn_) * (tn + fp) * (tn + fn_))
        result["mcc"] = float((tp * tn - fp * fn_) / denominator) if denominator > 0 else 0.0
    return result


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """The ranks of ``values`` from 1, tied values sharing the mean of the ranks they span (float64 [n])."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]]))  # first of each tie
    ends = np.concatenate([starts[1:], [values.size]])
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)  # mean of ranks start+1 .. end
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if x.min() == x.max() or y.min() == y.max():  # constant: undefined (tested exactly, not after rounding)
        return 0.0
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / math.sqrt(float((x * x).sum()) * float((y * y).sum())))


def regression_metrics(predictions, targets) -> dict:
    """``{"mse", "pearson", "spearman"}`` of predicted numbers against targets (the same shape, flattened), as
    Python floats; a correlation with a constant side is 0 (module docstring).

    Raises ValueError for empty inputs, different shapes, and values that are not finite numbers."""
    fn = "regression_metrics"
    predictions, targets = _array(predictions, "predictions", fn), _array(targets, "targets", fn)
    _same_shape(predictions, targets, ("predictions", "targets"), fn)
    if predictions.size == 0:
        raise ValueError(f"megacore.training.{fn}: no values")
    for name, array in (("predictions", predictions), ("targets", targets)):
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or not np.isfinite(array).all():
            raise ValueError(f"megacore.training.{fn}: {name} must be finite numbers")
    x, y = predictions.reshape(-1).astype(np.float64), targets.reshape(-1).astype(np.float64)
    return {"mse": float(((x - y) ** 2).mean()), "pearson": _pearson(x, y),
            "spearman": _pearson(_average_ranks(x), _average_ranks(y))}
