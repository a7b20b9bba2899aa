"""Blessing: a newly trained model replaces the published one only if it is at least as good.

TFX's Evaluator does the same: the candidate and the currently published
(baseline) model are scored on the same split of the same dataset, and the
candidate is published only when its selection metric is at least the
baseline's. A baseline trained on the same dataset (same fingerprint) was
already scored on that split when it was trained, so its stored validation
metrics are compared; a baseline from another dataset is re-scored on the
candidate's validation split through its own exported SavedModel (which
decodes and transforms as it did in training), so the numbers are comparable.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
import tensorflow as tf

from model_lib import dataset_io, evaluation, input_pipeline
from schemas import layout, model_artifacts
from schemas.classification_metrics import ModelMetrics, SplitEvaluation
from schemas.model_artifacts import ModelInfo

_EVAL_BATCH_SIZE = 64


class NotComparable(ValueError):
    """The baseline cannot be scored on the candidate's dataset (e.g. it lacks one of its labels)."""


@dataclasses.dataclass(frozen=True)
class BlessingDecision:
    """Whether the candidate is published, and why.

    Attributes:
      publish: True when the candidate replaces the published model.
      reason: One sentence for the summary and trials.json.
      candidate_score: The candidate's selection metric on the split.
      baseline_score: The baseline's on the same split (None without a baseline).
    """

    publish: bool
    reason: str
    candidate_score: float | None = None
    baseline_score: float | None = None


def metric_value(scores: Mapping[str, float] | SplitEvaluation, metric: str) -> float:
    """The selection metric (``val_accuracy`` or ``val_loss``) from a split's scores."""
    name = metric.removeprefix("val_")
    return float(scores[name]) if isinstance(scores, Mapping) else scores.value(name)


def is_at_least_as_good(candidate: float, baseline: float, metric: str) -> bool:
    """Loss is minimized, every other selection metric maximized."""
    return candidate <= baseline if metric == "val_loss" else candidate >= baseline


def evaluate_exported_model(model_dir: str, dataset_dir: str, split: str) -> SplitEvaluation:
    """Scores an exported model on one split of a dataset through its serving signature.

    Args:
      model_dir: An exported model directory (``saved_model/``, ``model_info.json``).
      dataset_dir: A create_dataset run directory.
      split: The split to score on.

    Returns:
      ``evaluation.classification_metrics`` of the model on the split.

    Raises:
      NotComparable: The split holds a label the model does not know, or is empty.
    """
    info = ModelInfo.read(model_dir)
    index_of = {label: i for i, label in enumerate(info.labels)}
    files = dataset_io.split_files(dataset_dir, split)
    if not files:
        raise NotComparable(f"split {split!r} of {dataset_dir} is empty")
    serve = tf.saved_model.load(layout.join(model_dir, model_artifacts.SAVED_MODEL_DIR)).signatures[
        model_artifacts.SERVING_SIGNATURE]
    truths: list[np.ndarray] = []
    probabilities: list[np.ndarray] = []
    for batch in dataset_io.read_dataset(files, batch_size=_EVAL_BATCH_SIZE):
        names = [value.decode("utf-8") for value in batch["label"].numpy()]
        unknown = sorted(set(names) - set(index_of))
        if unknown:
            raise NotComparable(f"model {info.model_version} does not know the labels {unknown[:5]}")
        outputs = serve(**{model_artifacts.IMAGE_BYTES_INPUT: batch["image"]})
        probabilities.append(outputs[model_artifacts.OUTPUT_PROBABILITIES].numpy())
        truths.append(np.asarray([index_of[name] for name in names], dtype=np.int64))
    return evaluation.classification_metrics(np.concatenate(truths), np.concatenate(probabilities), list(info.labels))


def decide(
    candidate_dir: str,
    candidate_validation: Mapping[str, float] | SplitEvaluation,
    baseline_dir: str | None,
    dataset_dir: str,
    metric: str,
    *,
    force: bool = False,
) -> BlessingDecision:
    """Decides whether the candidate model replaces the published baseline.

    Args:
      candidate_dir: The candidate's exported model directory.
      candidate_validation: Its scores on ``dataset_dir``'s validation split.
      baseline_dir: The published model directory, or None when none is published.
      dataset_dir: The create_dataset run the candidate was trained on.
      metric: ``val_accuracy`` or ``val_loss``.
      force: Publish whatever the comparison says (``--force_publish``).
    """
    candidate_score = metric_value(candidate_validation, metric)
    if baseline_dir is None:
        return BlessingDecision(True, "no model was published yet", candidate_score)
    candidate = ModelInfo.read(candidate_dir)
    baseline = ModelInfo.read(baseline_dir)
    if candidate.model_version == baseline.model_version:
        return BlessingDecision(False, f"model {baseline.model_version} is already the published one",
                                candidate_score, candidate_score)
    summary = input_pipeline.read_summary(dataset_dir)
    split = summary.validation_split
    try:
        if baseline.dataset_fingerprint == summary.fingerprint:
            baseline_scores = ModelMetrics.read(baseline_dir).validation
        else:
            baseline_scores = evaluate_exported_model(baseline_dir, dataset_dir, split)
    except NotComparable as error:
        if force:
            return BlessingDecision(True, f"--force_publish (the published model is not comparable: {error})",
                                    candidate_score)
        return BlessingDecision(
            False, f"the published model {baseline.model_version} cannot be scored on this dataset ({error}); "
                   "pass --force_publish to replace it", candidate_score)
    baseline_score = metric_value(baseline_scores, metric)
    comparison = (f"{metric} {candidate_score:.4f} vs {baseline_score:.4f} of the published model "
                  f"{baseline.model_version} on the {split} split")
    if force:
        return BlessingDecision(True, f"--force_publish ({comparison})", candidate_score, baseline_score)
    if is_at_least_as_good(candidate_score, baseline_score, metric):
        return BlessingDecision(True, f"at least as good: {comparison}", candidate_score, baseline_score)
    return BlessingDecision(False, f"worse: {comparison}; kept under trials/ (--force_publish publishes it)",
                            candidate_score, baseline_score)
