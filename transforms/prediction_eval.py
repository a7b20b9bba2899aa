"""Sliced evaluation of prediction rows whose true label is known (batch_predict's eval.json).

Rows are reduced to confusion counts with one ``CombineFn`` (so millions of
rows cost a few counters), and the report is computed from the counts by
``model_lib.metrics``, the implementation train's metrics.json uses:
accuracy, per-class and macro precision/recall/F1 and the confusion matrix
over the model's full label list, plus accuracy sliced by true label and by
an optional slice column. The report is an ``EvalReport``
(``schemas.classification_metrics``), written whole or not at all.
"""

from __future__ import annotations

import collections
from typing import Any, Iterable, Sequence

import apache_beam as beam

from model_lib import metrics
from schemas import prediction
from schemas.classification_metrics import EvalReport

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


def report_labels(model_labels: Sequence[str], confusion: collections.Counter) -> list[str]:
    """The model's labels, then the true labels it does not know (sorted) so they are scored too."""
    known = list(model_labels)
    return known + sorted({label for pair in confusion for label in pair} - set(known))


def evaluation_report(
    counts: Counts, labels: Sequence[str], *, slice_column: str | None = None, model_version: str = ""
) -> EvalReport:
    """The eval.json report from confusion counts.

    The metrics are ``model_lib.metrics``' (the definitions train's
    metrics.json uses) over ``report_labels``; the counts are exact sample
    weights, so the numbers equal scoring every row one by one.

    Args:
      counts: Output of ``ConfusionCountsFn``.
      labels: The model's labels.
      slice_column: The column ``counts["slices"]`` was keyed by, if any.
      model_version: Recorded so the report names the model it scores.

    Raises:
      ValueError: ``counts`` holds no scored row.
    """
    confusion: collections.Counter = counts["confusion"]
    classes = report_labels(labels, confusion)
    shared = metrics.metrics_from_counts(confusion, classes)
    slices = {
        prediction.TRUE_LABEL: {
            label: metrics.slice_accuracy({k: n for k, n in confusion.items() if k[0] == label}, classes)
            for label in sorted({t for t, _ in confusion})
        }
    }
    if slice_column is not None:
        values = sorted({value for value, _, _ in counts["slices"]})
        slices[slice_column] = {
            value: metrics.slice_accuracy(
                {(t, p): n for (v, t, p), n in counts["slices"].items() if v == value}, classes)
            for value in values
        }
    return EvalReport(**shared.shared_values(), model_version=model_version, slices=slices)


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
        yield report.write(self._path)


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
