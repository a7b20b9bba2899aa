"""The evaluation contracts: ``metrics.json`` (train) and ``eval.json`` (batch_predict).

Both files carry the same ``ClassificationMetrics`` under the same key names,
computed by the one implementation in ``model_lib.metrics`` over the full
label list, so a model's test accuracy or macro F1 from train and from
batch_predict on the same images are the same number:

- ``metrics.json`` (a model directory): ``ModelMetrics``, with a
  ``SplitEvaluation`` (the shared metrics plus cross-entropy ``loss``) for the
  validation and, when the dataset has one, the test split;
- ``eval.json`` (batch_predict's artifacts directory): ``EvalReport``, the
  shared metrics plus the scoring model's version and accuracy slices.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from schemas import artifact_files, layout, model_artifacts, prediction


@dataclasses.dataclass(frozen=True)
class ClassMetrics:
    """One class's precision, recall and F1 (0 where undefined) and its true-label support."""

    precision: float
    recall: float
    f1: float
    support: int

    @classmethod
    def from_dict(cls, content: dict[str, Any], source: str = "class metrics") -> "ClassMetrics":
        values = artifact_files.field_values(cls, content, source)
        return cls(float(values["precision"]), float(values["recall"]), float(values["f1"]), int(values["support"]))


@dataclasses.dataclass(frozen=True)
class ClassificationMetrics:
    """Single-label classification metrics over a fixed label list.

    Every class of ``labels`` counts, whether or not it occurs in the data: a
    class never seen nor predicted has precision, recall and F1 0 and lowers
    the macro averages (scikit-learn's ``labels=`` with ``zero_division=0``).

    Attributes:
      labels: Class names; the order of ``per_class`` rows and of the matrix.
      count: Examples scored.
      accuracy: Fraction predicted correctly.
      macro_precision: Unweighted mean over ``labels``.
      macro_recall: Unweighted mean over ``labels``.
      macro_f1: Unweighted mean over ``labels``.
      per_class: ``ClassMetrics`` of every label.
      confusion_matrix: ``len(labels) x len(labels)`` counts;
        ``confusion_matrix[i][j]`` counts true ``labels[i]`` predicted as ``labels[j]``.
    """

    labels: list[str]
    count: int
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    per_class: dict[str, ClassMetrics]
    confusion_matrix: list[list[int]]

    def shared_values(self) -> dict[str, Any]:
        """The fields of ``ClassificationMetrics`` only, to build a ``SplitEvaluation`` or ``EvalReport``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ClassificationMetrics)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, content: dict[str, Any], source: str = "classification metrics") -> "ClassificationMetrics":
        values = artifact_files.field_values(ClassificationMetrics, content, source)
        return ClassificationMetrics(
            labels=[str(label) for label in values["labels"]],
            count=int(values["count"]),
            accuracy=float(values["accuracy"]),
            macro_precision=float(values["macro_precision"]),
            macro_recall=float(values["macro_recall"]),
            macro_f1=float(values["macro_f1"]),
            per_class={
                str(label): ClassMetrics.from_dict(metrics, f"{source} per_class.{label}")
                for label, metrics in values["per_class"].items()
            },
            confusion_matrix=[[int(n) for n in row] for row in values["confusion_matrix"]],
        )


@dataclasses.dataclass(frozen=True)
class SplitEvaluation(ClassificationMetrics):
    """A model's metrics on one split of its dataset (a section of ``metrics.json``).

    Attributes:
      loss: Mean cross-entropy of the true class (clipped at 1e-7), the
        quantity training minimizes; it needs probabilities, so eval.json
        does not have it.
    """

    loss: float

    def value(self, name: str) -> float:
        """A scalar metric by name (``accuracy``, ``loss``, ``macro_f1``, ...), e.g. to select models by.

        Raises:
          ValueError: ``name`` is not a scalar metric.
        """
        scalars = {f.name for f in dataclasses.fields(self) if f.type in ("float", float)}
        if name not in scalars:
            raise ValueError(f"no scalar metric {name!r}; one of {sorted(scalars)}")
        return float(getattr(self, name))

    @classmethod
    def from_dict(cls, content: dict[str, Any], source: str = "split evaluation") -> "SplitEvaluation":
        shared = ClassificationMetrics.from_dict(content, source).shared_values()
        values = artifact_files.field_values(cls, content, source)
        return cls(**shared, loss=float(values["loss"]))


@dataclasses.dataclass(frozen=True)
class ModelMetrics:
    """``metrics.json`` of a model directory: its evaluation and how training went.

    Attributes:
      model_version: ``ModelInfo.model_version`` of the evaluated weights.
      selection_metric: The ``val_*`` metric early stopping and model
        selection used.
      validation: Metrics on the validation split.
      test: Metrics on the test split; None when the dataset has none.
      epochs_run: Epochs completed, resumed ones included.
      best_epoch: 1-based epoch whose weights were kept.
      initial_epoch: Epochs already done when the last run started.
      train_seconds: Fitting wall time of the last run.
      replicas: tf.distribute replicas.
      global_batch_size: Batch size across replicas.
      history: Keras history per metric, one value per epoch.
    """

    model_version: str
    selection_metric: str
    validation: SplitEvaluation
    test: SplitEvaluation | None
    epochs_run: int
    best_epoch: int
    initial_epoch: int
    train_seconds: float
    replicas: int
    global_batch_size: int
    history: dict[str, list[float]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return artifact_files.to_json_text(self.to_dict())

    @classmethod
    def from_json(cls, text: str, source: str = model_artifacts.METRICS_FILE) -> "ModelMetrics":
        return cls.from_dict(json.loads(text), source)

    @classmethod
    def from_dict(cls, content: dict[str, Any], source: str = model_artifacts.METRICS_FILE) -> "ModelMetrics":
        values = artifact_files.field_values(cls, content, source)
        test = values["test"]
        return cls(
            model_version=str(values["model_version"]),
            selection_metric=str(values["selection_metric"]),
            validation=SplitEvaluation.from_dict(values["validation"], f"{source} validation"),
            test=None if test is None else SplitEvaluation.from_dict(test, f"{source} test"),
            epochs_run=int(values["epochs_run"]),
            best_epoch=int(values["best_epoch"]),
            initial_epoch=int(values["initial_epoch"]),
            train_seconds=float(values["train_seconds"]),
            replicas=int(values["replicas"]),
            global_batch_size=int(values["global_batch_size"]),
            history={str(k): [float(v) for v in values_] for k, values_ in values["history"].items()},
        )

    @classmethod
    def read(cls, model_dir: str) -> "ModelMetrics":
        """Reads ``model_dir/metrics.json`` (local or gs://)."""
        path = layout.join(model_dir, model_artifacts.METRICS_FILE)
        return cls.from_dict(artifact_files.read_json(path), path)

    def write(self, model_dir: str) -> str:
        """Writes ``model_dir/metrics.json`` whole or not at all; returns its path."""
        path = layout.join(model_dir, model_artifacts.METRICS_FILE)
        artifact_files.write_json(path, self.to_dict())
        return path


@dataclasses.dataclass(frozen=True)
class SliceAccuracy:
    """Accuracy of the rows in one slice (e.g. one true label, one split)."""

    count: int
    accuracy: float

    @classmethod
    def from_dict(cls, content: dict[str, Any], source: str = "slice") -> "SliceAccuracy":
        values = artifact_files.field_values(cls, content, source)
        return cls(int(values["count"]), float(values["accuracy"]))


@dataclasses.dataclass(frozen=True)
class EvalReport(ClassificationMetrics):
    """``eval.json``: batch_predict's evaluation of the rows that had a true label.

    ``labels`` are the model's labels followed by any true label the model does
    not know (sorted), which are scored too (recall 0).

    Attributes:
      model_version: The model that predicted.
      slices: Per slice column (``true_label`` always, plus batch_predict's
        ``--slice_by`` column), ``SliceAccuracy`` per value.
    """

    model_version: str
    slices: dict[str, dict[str, SliceAccuracy]]

    def to_json(self) -> str:
        return artifact_files.to_json_text(self.to_dict())

    @classmethod
    def from_json(cls, text: str, source: str = prediction.EVAL_FILE) -> "EvalReport":
        return cls.from_dict(json.loads(text), source)

    @classmethod
    def from_dict(cls, content: dict[str, Any], source: str = prediction.EVAL_FILE) -> "EvalReport":
        shared = ClassificationMetrics.from_dict(content, source).shared_values()
        values = artifact_files.field_values(cls, content, source)
        return cls(
            **shared,
            model_version=str(values["model_version"]),
            slices={
                str(column): {
                    str(value): SliceAccuracy.from_dict(accuracy, f"{source} slices.{column}.{value}")
                    for value, accuracy in by_value.items()
                }
                for column, by_value in values["slices"].items()
            },
        )

    @classmethod
    def read(cls, path: str) -> "EvalReport":
        """Reads an eval.json file (local or gs://)."""
        return cls.from_dict(artifact_files.read_json(path), path)

    def write(self, path: str) -> str:
        """Writes the report to ``path`` whole or not at all; returns the path."""
        artifact_files.write_json(path, self.to_dict())
        return path
