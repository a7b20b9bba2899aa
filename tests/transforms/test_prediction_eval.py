"""batch_predict's eval.json reports the numbers train's metrics.json reports for the same predictions."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from model_lib import evaluation
from schemas import prediction
from schemas.classification_metrics import ClassMetrics, EvalReport, SliceAccuracy
from transforms.prediction_eval import WriteEvaluation

LABELS = ["cat", "dog", "fox", "owl"]  # "owl" is in the vocabulary but in no row.


def prediction_row(true_label: str | None, label: str, split: str) -> dict[str, object]:
    return {prediction.TRUE_LABEL: true_label, prediction.LABEL: label, prediction.SPLIT: split,
            prediction.SOURCE: None}


def evaluate_rows(rows: list[dict[str, object]], path: str, labels: list[str]) -> EvalReport:
    """Runs the Beam evaluation (CombineFn of confusion counts, then the report) and reads eval.json back."""
    with TestPipeline(runner="FnApiRunner") as pipeline:
        written = (
            pipeline
            | "CreateRows" >> beam.Create(rows)
            | "Evaluate" >> WriteEvaluation(path, labels, slice_column=prediction.SPLIT, model_version="v1")
        )
        assert_that(written, equal_to([path]), label="CheckWritten")
    return EvalReport.read(path)


def test_eval_json_equals_trains_evaluation_of_the_same_predictions(tmp_path):
    rng = np.random.default_rng(3)
    y_true, y_pred = rng.integers(0, 3, 240), rng.integers(0, 3, 240)
    y_pred[:150] = y_true[:150]  # A decent classifier, with mistakes in every class.
    splits = rng.choice(["train", "test"], 240)
    rows = [prediction_row(LABELS[t], LABELS[p], s) for t, p, s in zip(y_true, y_pred, splits)]
    rows.append(prediction_row(None, "cat", "test"))  # No true label: not scored.

    report = evaluate_rows(rows, str(tmp_path / prediction.EVAL_FILE), LABELS)
    # train scores the argmax of the model's probabilities; one-hot rows give the same top-1.
    train_side = evaluation.classification_metrics(y_true, np.eye(len(LABELS), dtype=np.float32)[y_pred], LABELS)

    assert report.shared_values() == train_side.shared_values()  # Exactly equal, not approximately.
    assert report.labels == LABELS and report.count == 240
    assert len(report.confusion_matrix) == len(LABELS) and all(len(r) == len(LABELS) for r in report.confusion_matrix)
    assert report.per_class["owl"] == ClassMetrics(0.0, 0.0, 0.0, 0)
    assert report.macro_f1 == pytest.approx(sum(c.f1 for c in report.per_class.values()) / len(LABELS))
    assert report.model_version == "v1"
    for split in ("train", "test"):
        in_split = splits == split
        assert report.slices[prediction.SPLIT][split] == SliceAccuracy(
            int(in_split.sum()), float(np.mean(y_true[in_split] == y_pred[in_split])))
    assert set(report.slices[prediction.TRUE_LABEL]) == {"cat", "dog", "fox"}
    assert report.slices[prediction.TRUE_LABEL]["dog"].accuracy == report.per_class["dog"].recall


def test_a_true_label_the_model_does_not_know_is_scored_as_an_extra_class(tmp_path):
    rows = [prediction_row("cat", "cat", "test"), prediction_row("yak", "dog", "test")]
    report = evaluate_rows(rows, str(tmp_path / prediction.EVAL_FILE), ["cat", "dog"])
    assert report.labels == ["cat", "dog", "yak"]
    assert report.confusion_matrix == [[1, 0, 0], [0, 0, 0], [0, 1, 0]]
    assert report.per_class["yak"] == ClassMetrics(0.0, 0.0, 0.0, 1)
    assert report.accuracy == 0.5


def test_no_labelled_row_writes_no_report(tmp_path):
    path = str(tmp_path / prediction.EVAL_FILE)
    with TestPipeline(runner="FnApiRunner") as pipeline:
        written = (
            pipeline
            | "CreateRows" >> beam.Create([prediction_row(None, "cat", "test")])
            | "Evaluate" >> WriteEvaluation(path, LABELS, slice_column=None, model_version="v1")
        )
        assert_that(written, equal_to([]), label="CheckNothingWritten")
    assert not (tmp_path / prediction.EVAL_FILE).exists()
