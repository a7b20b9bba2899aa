"""Classification metrics and plots on hand-checked predictions."""

from __future__ import annotations

import numpy as np
import pytest

from model_lib import evaluation


def test_classification_metrics_match_hand_computed_values():
    labels = ["cat", "dog", "fox"]
    y_true = np.array([0, 0, 1, 1, 2, 2])
    # Predicted classes: 0, 1, 1, 1, 2, 0
    probabilities = np.array([
        [0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1],
        [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.5, 0.2, 0.3],
    ], dtype=np.float32)
    metrics = evaluation.classification_metrics(y_true, probabilities, labels)
    assert metrics["count"] == 6
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert metrics["per_class"]["cat"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert metrics["per_class"]["dog"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert metrics["per_class"]["fox"] == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    want_loss = -np.mean(np.log([0.8, 0.3, 0.7, 0.8, 0.8, 0.3]))  # probability of the true class
    assert metrics["loss"] == pytest.approx(want_loss, rel=1e-5)


def test_a_class_never_predicted_has_zero_precision_not_an_error():
    metrics = evaluation.classification_metrics(
        np.array([0, 1]), np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]], dtype=np.float32), ["a", "b", "c"]
    )
    assert metrics["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert metrics["accuracy"] == 1.0


def test_plots_are_png_files(tmp_path):
    curves, matrix = str(tmp_path / "curves.png"), str(tmp_path / "matrix.png")
    evaluation.plot_training_curves(
        {"loss": [1.0, 0.5], "val_loss": [1.1, 0.6], "accuracy": [0.5, 0.8], "val_accuracy": [0.4, 0.7]}, curves
    )
    evaluation.plot_confusion_matrix([[3, 1], [0, 4]], ["a", "b"], matrix, title="test")
    for path in (curves, matrix):
        with open(path, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
