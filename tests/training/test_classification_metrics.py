"""megacore.training.classification_metrics / regression_metrics against computations written out by hand (and, where
installed, scikit-learn's and scipy's functions), their conventions for undefined values, -100 and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megacore.training import classification_metrics, regression_metrics


def test_three_classes_by_hand_with_ignored_positions():
    labels = [0, 0, 1, 1, 1, 2, -100, -100]
    predictions = [0, 1, 1, 1, 0, 0, 2, 1]  # the last two are ignored with their labels
    # counted: (0,0) (0,1) (1,1) (1,1) (1,0) (2,0): 3 of 6 right
    # class 0: tp 1, predicted 3, actual 2 -> F1 = 2*1 / (3 + 2) = 0.4
    # class 1: tp 2, predicted 3, actual 3 -> F1 = 2*2 / (3 + 3) = 2/3
    # class 2: tp 0, predicted 0, actual 1 -> precision undefined -> F1 0 (zero_division=0)
    got = classification_metrics(predictions, labels, num_labels=3)
    assert got == pytest.approx({"accuracy": 3 / 6, "macro_f1": (0.4 + 2 / 3 + 0.0) / 3})
    assert "mcc" not in got


def test_macro_f1_counts_only_classes_in_the_labels_or_the_predictions():
    # 4 classes, class 3 never appears: macro-F1 averages over classes 0, 1, 2 (scikit-learn's labels=None)
    # class 0: tp 1, predicted 1, actual 1 -> 1; class 1: tp 1, predicted 2, actual 1 -> 2/3; class 2: tp 0,
    # predicted 0, actual 1 -> 0
    got = classification_metrics([0, 1, 1], [0, 1, 2], num_labels=4)
    assert got["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3) and got["accuracy"] == pytest.approx(2 / 3)


def test_binary_matthews_correlation_by_hand():
    labels = [1, 1, 1, 0, 0, 0, 0, 1]
    predictions = [1, 1, 0, 0, 0, 1, 0, 1]
    tp, tn, fp, fn = 3, 3, 1, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))  # 8 / 16 = 0.5
    got = classification_metrics(torch.tensor(predictions), np.array(labels), 2)
    assert got == pytest.approx({"accuracy": 6 / 8, "macro_f1": 0.75, "mcc": 0.5}) and mcc == 0.5
    assert classification_metrics([1, 0], [0, 1], 2)["mcc"] == -1.0  # all wrong
    # shapes are kept together: a tagging batch [b, s] with -100 at padding
    batch = classification_metrics(torch.tensor([[1, 1, 0], [0, 1, 1]]), torch.tensor([[1, -100, 0], [1, 1, -100]]), 2)
    assert batch["accuracy"] == pytest.approx(3 / 4)


def test_degenerate_cases():
    one_class = classification_metrics([1, 1, 1], [1, 1, 1], 2)
    assert one_class == {"accuracy": 1.0, "macro_f1": 1.0, "mcc": 0.0}  # MCC undefined -> 0 (scikit-learn)
    constant = classification_metrics([0, 0, 0, 0], [0, 1, 0, 1], 2)
    assert constant["mcc"] == 0.0 and constant["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)
    for predictions, labels in (([], []), ([1, 0], [-100, -100])):
        with pytest.raises(ValueError, match="nothing to count"):
            classification_metrics(predictions, labels, 2)
    with pytest.raises(ValueError, match=r"labels holds 2, outside \[0, 2\) \(and -100 to ignore\)"):
        classification_metrics([0, 1], [0, 2], 2)
    with pytest.raises(ValueError, match=r"predictions holds -1, outside \[0, 3\)"):
        classification_metrics([0, -1], [0, 1], 3)
    with pytest.raises(ValueError, match=r"predictions has shape \[3\], labels \[2\]"):
        classification_metrics([0, 1, 1], [0, 1], 2)
    with pytest.raises(ValueError, match="integer class ids, got dtype float32.*argmax of the logits"):
        classification_metrics(torch.zeros(2), [0, 1], 3)
    with pytest.raises(ValueError, match="num_labels=0 must be a positive int"):
        classification_metrics([0], [0], 0)


def test_regression_by_hand():
    predictions, targets = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 5.0]
    # mse: (0 + 1 + 1 + 1) / 4
    # pearson: x - 2.5 = (-1.5, -0.5, 0.5, 1.5), y - 2.75 = (-1.75, 0.25, -0.75, 2.25)
    #   sum xy = 2.625 - 0.125 - 0.375 + 3.375 = 5.5; sum x^2 = 5; sum y^2 = 3.0625 + 0.0625 + 0.5625 + 5.0625 = 8.75
    # spearman: ranks (1, 2, 3, 4) and (1, 3, 2, 4): 1 - 6 * (0 + 1 + 1 + 0) / (4 * 15) = 0.8
    got = regression_metrics(predictions, targets)
    assert got == pytest.approx({"mse": 0.75, "pearson": 5.5 / math.sqrt(5 * 8.75), "spearman": 0.8})


def test_spearman_gives_ties_their_average_rank():
    # x ranks: 1, 2.5, 2.5, 4 (the two 2s share ranks 2 and 3); y ranks: 1, 2, 3, 4
    # pearson of the ranks: x - 2.5 = (-1.5, 0, 0, 1.5), y - 2.5 = (-1.5, -0.5, 0.5, 1.5)
    #   sum xy = 2.25 + 2.25 = 4.5; sum x^2 = 4.5; sum y^2 = 5 -> 4.5 / sqrt(22.5)
    got = regression_metrics(torch.tensor([1.0, 2.0, 2.0, 7.0]), np.array([10, 20, 30, 40]))
    assert got["spearman"] == pytest.approx(4.5 / math.sqrt(22.5))


def test_regression_degenerate_cases():
    constant = regression_metrics([0.1, 0.1, 0.1], [1.0, 2.0, 3.0])  # 0.1's mean is not exactly 0.1
    assert constant["pearson"] == constant["spearman"] == 0.0
    assert constant["mse"] == pytest.approx((0.81 + 3.61 + 8.41) / 3)
    assert regression_metrics([2.0], [3.0]) == {"mse": 1.0, "pearson": 0.0, "spearman": 0.0}
    with pytest.raises(ValueError, match="regression_metrics: no values"):
        regression_metrics([], [])
    with pytest.raises(ValueError, match="targets must be finite numbers"):
        regression_metrics([1.0, 2.0], [1.0, float("nan")])
    with pytest.raises(ValueError, match=r"predictions has shape \[2\], targets \[3\]"):
        regression_metrics([1.0, 2.0], [1.0, 2.0, 3.0])


def test_the_same_numbers_as_scipy_on_random_data():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 200).astype(np.float64)  # many ties
    y = x + rng.normal(size=200)
    got = regression_metrics(x, y)
    assert got["pearson"] == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert got["spearman"] == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
