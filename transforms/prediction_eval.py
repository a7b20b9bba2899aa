"""Sliced evaluation of prediction rows whose true label is known (batch_predict's eval.json).

Rows are reduced to confusion counts with one ``CombineFn`` (so millions of
rows cost a few counters), and the report is computed from the counts by a
pure function: accuracy, per-class precision/recall/F1, the confusion matrix,
and accuracy sliced by true label and by an optional slice column.
"""

from __future__ import annotations

import collections
import json
from typing import Any, Iterable, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from schemas import prediction

NO_VALUE = "(none)"

Counts = dict[str, collections.Counter]


class ConfusionCountsFn(beam.CombineFn):
    """Prediction rows -> ``{"confusion": Counter[(true, predicted)], "slices": Counter[(value, true, predicted)]}``.

    Rows without a true label are skipped: they cannot be scored.
    """

    def __init__(self, slice_column: str | None):
        super().__init__()
        if slice_column is not None and slice_column not in prediction.SLICE_COLUMNS:
            raise ValueError(f"slice_column must be one of {prediction.SLICE_COLUMNS}. "
                             f"Received `slice_column={slice_column}`")
        self._slice_column = slice_column

    def create_accumulator(self) -> Counts:
        return {"confusion": collections.Counter(), "slices": collections.Counter()}

    def add_input(self, counts: Counts, row: dict[str, Any]) -> Counts:
        true_label = row[prediction.TRUE_LABEL]
        if true_label is None:
            return counts
        predicted = row[prediction.LABEL]
        counts["confusion"][(true_label, predicted)] += 1
        if self._slice_column is not None:
            value = row[self._slice_column]
            counts["slices"][(NO_VALUE if value is None else str(value), true_label, predicted)] += 1
        return counts

    def merge_accumulators(self, accumulators: Iterable[Counts]) -> Counts:
        merged = self.create_accumulator()
        for counts in accumulators:
            merged["confusion"].update(counts["confusion"])
            merged["slices"].update(counts["slices"])
        return merged

    def extract_output(self, counts: Counts) -> Counts:
        return counts


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def _accuracy_slice(confusion: collections.Counter) -> dict[str, Any]:
    count = sum(confusion.values())
    correct = sum(n for (true_label, predicted), n in confusion.items() if true_label == predicted)
    return {"count": count, "accuracy": _ratio(correct, count)}


def evaluation_report(
    counts: Counts, labels: Sequence[str], *, slice_column: str | None = None, model_version: str = ""
) -> dict[str, Any]:
    """The eval.json document from confusion counts.

    Args:
      counts: Output of ``ConfusionCountsFn``.
      labels: The model's labels; true labels the model does not know are
        appended (sorted) so they are scored too (with recall 0).
      slice_column: The column ``counts["slices"]`` was keyed by, if any.
      model_version: Recorded so the report names the model it scores.

    Returns:
      ``count``, ``accuracy``, ``macro_precision/recall/f1`` (over classes
      that occur as true or predicted labels), ``per_class``,
      ``confusion_matrix`` (rows true, columns predicted) and ``slices``.
    """
    confusion: collections.Counter = counts["confusion"]
    known = list(labels)
    extra = sorted({label for pair in confusion for label in pair} - set(known))
    classes = known + extra
    per_class: dict[str, dict[str, Any]] = {}
    for label in classes:
        true_positives = confusion[(label, label)]
        predicted = sum(n for (_, p), n in confusion.items() if p == label)
        support = sum(n for (t, _), n in confusion.items() if t == label)
        precision = _ratio(true_positives, predicted)
        recall = _ratio(true_positives, support)
        per_class[label] = {
            "precision": precision,
            "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "support": support,
        }
    present = [
        label for label in classes
        if per_class[label]["support"] or any(p == label for (_, p) in confusion)
    ]
    report: dict[str, Any] = {
        "model_version": model_version,
        **_accuracy_slice(confusion),
        **{
            f"macro_{metric}": sum(per_class[c][metric] for c in present) / len(present) if present else 0.0
            for metric in ("precision", "recall", "f1")
        },
        "per_class": per_class,
        "confusion_matrix": {
            "labels": classes,
            "matrix": [[confusion[(t, p)] for p in classes] for t in classes],
        },
    }
    by_label = {
        label: _accuracy_slice(collections.Counter({k: n for k, n in confusion.items() if k[0] == label}))
        for label in classes if per_class[label]["support"]
    }
    slices: dict[str, Any] = {prediction.TRUE_LABEL: by_label}
    if slice_column is not None:
        values = sorted({value for value, _, _ in counts["slices"]})
        slices[slice_column] = {
            value: _accuracy_slice(
                collections.Counter({(t, p): n for (v, t, p), n in counts["slices"].items() if v == value})
            )
            for value in values
        }
    report["slices"] = slices
    return report


class WriteEvalReportFn(beam.DoFn):
    """Writes the report as one JSON file when at least one row had a true label."""

    def __init__(self, path: str, labels: Sequence[str], slice_column: str | None, model_version: str):
        self._path = path
        self._labels = list(labels)
        self._slice_column = slice_column
        self._model_version = model_version

    def process(self, counts: Counts) -> Iterable[str]:
        if not counts["confusion"]:
            return
        report = evaluation_report(
            counts, self._labels, slice_column=self._slice_column, model_version=self._model_version
        )
        with FileSystems.create(self._path) as handle:
            handle.write(json.dumps(report, indent=2, sort_keys=True).encode("utf-8"))
        yield self._path


class WriteEvaluation(beam.PTransform):
    """Prediction rows -> ``eval.json`` at ``path`` (written only when labels are present).

    Returns a PCollection holding the written path (empty without labels).
    """

    def __init__(self, path: str, labels: Sequence[str], *, slice_column: str | None, model_version: str):
        super().__init__()
        self._path = path
        self._labels = list(labels)
        self._slice_column = slice_column
        self._model_version = model_version

    def expand(self, rows: beam.PCollection[dict[str, Any]]) -> beam.PCollection[str]:
        return (
            rows
            | "CountConfusions" >> beam.CombineGlobally(ConfusionCountsFn(self._slice_column))
            | "WriteEvalJson"
            >> beam.ParDo(WriteEvalReportFn(self._path, self._labels, self._slice_column, self._model_version))
        )
