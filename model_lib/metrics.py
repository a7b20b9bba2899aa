"""The one implementation of the classification metrics, used by train and batch_predict.

scikit-learn computes everything, always with ``labels=`` the full label
list and ``zero_division=0``, so a class absent from the data still has a
row and column in the confusion matrix and counts (as 0) in the macro
averages. Train scores arrays of predictions; batch_predict reduces millions
of rows to confusion counts in a ``CombineFn`` first and passes the counts as
integer sample weights, which gives exactly the same numbers (every weighted
sum is a sum of integers).

Only numpy, scikit-learn and the ``schemas`` contract are imported (no
TensorFlow or Keras), so Beam workers that evaluate predictions do not load a
deep-learning framework for it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from sklearn import metrics as sk_metrics

from schemas.classification_metrics import ClassificationMetrics, ClassMetrics, SliceAccuracy

# Probabilities are clipped here before the log, so a confident mistake costs a finite loss.
_MIN_PROBABILITY = 1e-7


def _as_indices(values: Sequence[int] | np.ndarray, name: str, num_labels: int) -> np.ndarray:
    indices = np.asarray(values, dtype=np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= num_labels):
        raise ValueError(f"{name} holds label indices outside [0, {num_labels}). "
                         f"Received `{name}` with min {indices.min()} and max {indices.max()}")
    return indices


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    labels: Sequence[str],
    *,
    sample_weight: Sequence[int] | np.ndarray | None = None,
) -> ClassificationMetrics:
    """Accuracy, per-class and macro precision/recall/F1 and the confusion matrix.

    Args:
      y_true: True label indices into ``labels``.
      y_pred: Predicted label indices into ``labels``.
      labels: Every class name, in index order; all of them are scored.
      sample_weight: Integer count of each ``(y_true[i], y_pred[i])`` pair
        (used to score confusion counts); None counts each pair once.

    Returns:
      The ``ClassificationMetrics``.

    Raises:
      ValueError: no example, mismatched lengths, or an index outside ``labels``.
    """
    labels = [str(label) for label in labels]
    truths = _as_indices(y_true, "y_true", len(labels))
    predictions = _as_indices(y_pred, "y_pred", len(labels))
    if truths.shape != predictions.shape:
        raise ValueError(f"y_true and y_pred differ in length: {truths.size} != {predictions.size}")
    weights = None if sample_weight is None else np.asarray(sample_weight, dtype=np.int64).reshape(-1)
    if weights is not None and weights.shape != truths.shape:
        raise ValueError(f"sample_weight has {weights.size} entries for {truths.size} examples")
    count = int(truths.size if weights is None else weights.sum())
    if count == 0:
        raise ValueError("cannot compute metrics without examples")
    classes = list(range(len(labels)))
    precision, recall, f1, support = sk_metrics.precision_recall_fscore_support(
        truths, predictions, labels=classes, zero_division=0, sample_weight=weights)
    macro_precision, macro_recall, macro_f1, _ = sk_metrics.precision_recall_fscore_support(
        truths, predictions, labels=classes, average="macro", zero_division=0, sample_weight=weights)
    matrix = sk_metrics.confusion_matrix(truths, predictions, labels=classes, sample_weight=weights)
    return ClassificationMetrics(
        labels=labels,
        count=count,
        accuracy=float(sk_metrics.accuracy_score(truths, predictions, sample_weight=weights)),
        macro_precision=float(macro_precision),
        macro_recall=float(macro_recall),
        macro_f1=float(macro_f1),
        per_class={
            label: ClassMetrics(float(precision[i]), float(recall[i]), float(f1[i]), int(support[i]))
            for i, label in enumerate(labels)
        },
        confusion_matrix=[[int(n) for n in row] for row in matrix],
    )


def _pairs_and_weights(
    counts: Mapping[tuple[str, str], int], labels: Sequence[str]
) -> tuple[list[int], list[int], list[int]]:
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({label for pair in counts for label in pair} - set(index))
    if unknown:
        raise ValueError(f"confusion counts name labels outside the label list: {unknown}")
    pairs = sorted(counts.items())  # A fixed order: the result never depends on bundle order.
    return ([index[t] for (t, _), _ in pairs], [index[p] for (_, p), _ in pairs], [n for _, n in pairs])


def metrics_from_counts(counts: Mapping[tuple[str, str], int], labels: Sequence[str]) -> ClassificationMetrics:
    """``classification_metrics`` of ``{(true_label, predicted_label): count}``.

    Raises:
      ValueError: a label of ``counts`` is not in ``labels``, or there is no count.
    """
    y_true, y_pred, weights = _pairs_and_weights(counts, labels)
    return classification_metrics(y_true, y_pred, labels, sample_weight=weights)


def slice_accuracy(counts: Mapping[tuple[str, str], int], labels: Sequence[str]) -> SliceAccuracy:
    """Count and accuracy (same definition as ``classification_metrics``) of one slice's counts."""
    y_true, y_pred, weights = _pairs_and_weights(counts, labels)
    count = sum(weights)
    if count == 0:
        raise ValueError("cannot compute accuracy without examples")
    return SliceAccuracy(count, float(sk_metrics.accuracy_score(y_true, y_pred, sample_weight=weights)))


def cross_entropy(y_true: Sequence[int] | np.ndarray, probabilities: np.ndarray) -> float:
    """Mean negative log-probability of the true class (clipped at 1e-7): the training loss.

    Raises:
      ValueError: no example, or ``probabilities`` is not ``[len(y_true), classes]``.
    """
    probabilities = np.asarray(probabilities, dtype=np.float32)
    examples = np.asarray(y_true).size
    if probabilities.ndim != 2 or probabilities.shape[0] != examples or examples == 0:
        raise ValueError(f"probabilities must be [examples, classes] for {examples} examples. "
                         f"Received `probabilities` of shape {probabilities.shape}")
    truths = _as_indices(y_true, "y_true", probabilities.shape[1])
    clipped = np.clip(probabilities[np.arange(truths.size), truths], _MIN_PROBABILITY, 1.0)
    return float(-np.mean(np.log(clipped)))
