"""Evaluation of a trained classifier on a dataset split, and the PNG plots of a model directory.

The metrics come from ``model_lib.metrics`` (the one implementation,
shared with batch_predict's eval.json) over the model's full label list;
this module only runs the model to get predictions and probabilities.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from model_lib import metrics
from schemas.classification_metrics import SplitEvaluation

TRAINING_CURVES_PLOT = "training_curves.png"
CONFUSION_MATRIX_PLOT = "confusion_matrix.png"


def predict_split(model: keras.Model, batches: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Runs the model over ``(pixels, label_index)`` batches.

    Returns:
      ``(label_indices [N] int64, probabilities [N, classes] float32)``.
    """
    truths: list[np.ndarray] = []
    probabilities: list[np.ndarray] = []
    for pixels, label_index in batches:
        probabilities.append(np.asarray(model(pixels, training=False)))
        truths.append(label_index.numpy())
    if not truths:
        raise ValueError("cannot evaluate on an empty split")
    return np.concatenate(truths).astype(np.int64), np.concatenate(probabilities).astype(np.float32)


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray, labels: list[str]) -> SplitEvaluation:
    """The shared classification metrics of the top-1 predictions, plus the cross-entropy loss.

    Args:
      y_true: Label indices into ``labels``.
      probabilities: ``[N, len(labels)]`` predicted probabilities.
      labels: Class names in index order (the model's full label list).
    """
    shared = metrics.classification_metrics(y_true, probabilities.argmax(axis=1), labels)
    return SplitEvaluation(**shared.shared_values(), loss=metrics.cross_entropy(y_true, probabilities))


def evaluate(model: keras.Model, batches: tf.data.Dataset, labels: list[str]) -> SplitEvaluation:
    """``classification_metrics`` of the model on one split's batches."""
    y_true, probabilities = predict_split(model, batches)
    return classification_metrics(y_true, probabilities, labels)


def _save_figure(figure: Any, path: str) -> None:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    with tf.io.gfile.GFile(path, "wb") as handle:
        handle.write(buffer.getvalue())


def plot_training_curves(history: dict[str, list[float]], path: str) -> None:
    """One panel per metric (loss, accuracy, ...), train and validation curves together."""
    import matplotlib

    matplotlib.use("Agg")  # Headless: workers have no display.
    from matplotlib import pyplot as plt

    names = sorted(k for k in history if not k.startswith("val_") and k != "learning_rate")
    figure, axes = plt.subplots(1, max(len(names), 1), figsize=(5 * max(len(names), 1), 4), squeeze=False)
    for axis, name in zip(axes[0], names):
        epochs = range(1, len(history[name]) + 1)
        axis.plot(epochs, history[name], label=f"train {name}")
        if f"val_{name}" in history:
            axis.plot(range(1, len(history[f"val_{name}"]) + 1), history[f"val_{name}"], label=f"validation {name}")
        axis.set_xlabel("epoch")
        axis.set_title(name)
        axis.legend()
    _save_figure(figure, path)
    plt.close(figure)


def plot_confusion_matrix(matrix: list[list[int]], labels: list[str], path: str, title: str = "") -> None:
    """Heat map of a confusion matrix with counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    counts = np.asarray(matrix)
    side = max(4.0, 0.5 * len(labels) + 2)
    figure, axis = plt.subplots(figsize=(side, side))
    axis.imshow(counts, cmap="Blues")
    axis.set_xticks(range(len(labels)), labels, rotation=90)
    axis.set_yticks(range(len(labels)), labels)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title or "confusion matrix")
    if len(labels) <= 30:
        threshold = counts.max() / 2 if counts.size else 0
        for (i, j), count in np.ndenumerate(counts):
            axis.text(j, i, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    _save_figure(figure, path)
    plt.close(figure)
