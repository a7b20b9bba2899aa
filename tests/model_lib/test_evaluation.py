"""Classification metrics and plots on hand-checked predictions."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from model_lib import evaluation, metrics
from schemas.classification_metrics import ClassMetrics


def test_split_evaluation_matches_hand_computed_values():
    labels = ["cat", "dog", "fox"]
    y_true = np.array([0, 0, 1, 1, 2, 2])
    # Predicted classes: 0, 1, 1, 1, 2, 0
    probabilities = np.array([
        [0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1],
        [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.5, 0.2, 0.3],
    ], dtype=np.float32)
    result = evaluation.classification_metrics(y_true, probabilities, labels)
    assert result.labels == labels
    assert result.count == 6
    assert result.accuracy == pytest.approx(4 / 6)
    assert result.confusion_matrix == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert result.per_class["cat"] == ClassMetrics(0.5, 0.5, 0.5, 2)
    assert dataclasses.astuple(result.per_class["dog"]) == pytest.approx((2 / 3, 1.0, 0.8, 2))
    assert dataclasses.astuple(result.per_class["fox"]) == pytest.approx((1.0, 0.5, 2 / 3, 2))
    assert result.macro_precision == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    assert result.macro_recall == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert result.macro_f1 == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    want_loss = -np.mean(np.log([0.8, 0.3, 0.7, 0.8, 0.8, 0.3]))  # probability of the true class
    assert result.loss == pytest.approx(want_loss, rel=1e-5)
    assert result.value("loss") == result.loss
    with pytest.raises(ValueError, match="no scalar metric"):
        result.value("per_class")


def test_a_label_absent_from_the_data_counts_in_the_macro_averages():
    result = evaluation.classification_metrics(
        np.array([0, 1]), np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]], dtype=np.float32), ["a", "b", "c"]
    )
    assert result.per_class["c"] == ClassMetrics(0.0, 0.0, 0.0, 0)
    assert result.accuracy == 1.0
    # Averaged over all three labels, not over the two that occur.
    assert result.macro_f1 == pytest.approx(2 / 3)
    assert result.confusion_matrix == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]


def test_counts_as_sample_weights_give_exactly_the_per_row_numbers():
    labels = ["a", "b", "c", "d"]
    rng = np.random.default_rng(7)
    y_true, y_pred = rng.integers(0, 3, 500), rng.integers(0, 3, 500)  # "d" never occurs
    per_row = metrics.classification_metrics(y_true, y_pred, labels)
    counts: dict[tuple[str, str], int] = {}
    for t, p in zip(y_true, y_pred):
        counts[(labels[t], labels[p])] = counts.get((labels[t], labels[p]), 0) + 1
    assert metrics.metrics_from_counts(counts, labels) == per_row


def test_invalid_inputs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="outside"):
        metrics.classification_metrics([0, 3], [0, 1], ["a", "b"])
    with pytest.raises(ValueError, match="without examples"):
        metrics.classification_metrics([], [], ["a"])
    with pytest.raises(ValueError, match="outside the label list"):
        metrics.metrics_from_counts({("a", "z"): 1}, ["a"])


def test_the_metrics_module_loads_neither_tensorflow_nor_keras():
    code = ("import sys, model_lib.metrics, transforms.prediction_eval; "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_plots_are_png_files(tmp_path):
    curves, matrix = str(tmp_path / "curves.png"), str(tmp_path / "matrix.png")
    evaluation.plot_training_curves(
        {"loss": [1.0, 0.5], "val_loss": [1.1, 0.6], "accuracy": [0.5, 0.8], "val_accuracy": [0.4, 0.7]}, curves
    )
    evaluation.plot_confusion_matrix([[3, 1], [0, 4]], ["a", "b"], matrix, title="test")
    for path in (curves, matrix):
        with open(path, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
