"""Continuous evaluation of a prediction stream: late ground-truth labels joined to predictions, and drift.

Labels arrive later than predictions, on their own subscription, as JSON
``{"image_id": "...", "label": "..."}``. ``JoinLabelsFn`` is a stateful join
keyed by image_id: whichever side comes first waits in state until the other
arrives, or until ``timeout_secs`` of processing time pass (then it expires, is
counted, and the state is freed), so unmatched predictions never pile up.

Joined pairs are scored in processing-time panes (every ``interval_secs``; see
``transforms.stream_monitoring`` for why not event-time windows) by the
project's one metrics implementation: ``transforms.prediction_eval``'s
confusion counts and ``model_lib.metrics`` (accuracy, per-class recall over the
model's full label list), the numbers batch_predict's eval.json and train's
metrics.json report. An accuracy below the threshold raises an alert.

Drift: each monitoring report's predicted-label distribution is compared with
the training split's label distribution from the dataset's
``dataset_info.json`` by total variation distance (half the L1 distance, 0 =
same, 1 = disjoint); above the threshold raises an alert.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Iterable, Sequence

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger, window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer

from schemas import prediction
from schemas.dataset_info import DatasetInfo
from schemas.dead_letter import DeadLetter
from schemas.publication import published_dir
from transforms.dead_letters import METRICS_NAMESPACE, RejectedInput
from transforms.image_inputs import message_ref
from transforms.prediction_eval import ConfusionCountsFn, evaluation_report
from transforms.pubsub_io import MALFORMED_MESSAGE, message_id_of
from transforms.stream_monitoring import MonitoringReport

LABEL_STAGE = "parse_label"
EVAL_STAGE = "continuous_evaluation"
ACCURACY_ALERT = "accuracy_below_threshold"
DRIFT_ALERT = "prediction_drift"
PREDICTION_KIND = "prediction"
LABEL_KIND = "label"
EXPIRED_COUNTER = "label_join_expired"
JOINED_COUNTER = "label_join_matched"
DEAD_LETTERS = "dead_letters"

JoinInput = tuple[str, tuple[str, Any]]


def parse_label(message: PubsubMessage) -> tuple[str, tuple[str, str]]:
    """A label message -> ``(image_id, ("label", label))``.

    Raises:
      RejectedInput: ``malformed_message``.
    """
    try:
        body = json.loads((message.data or b"").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RejectedInput(MALFORMED_MESSAGE, f"label message is not JSON: {error}") from error
    if not isinstance(body, dict) or not all(isinstance(body.get(k), str) and body.get(k)
                                             for k in (prediction.IMAGE_ID, prediction.LABEL)):
        raise RejectedInput(MALFORMED_MESSAGE, 'label messages are {"image_id": "...", "label": "..."}')
    return body[prediction.IMAGE_ID], (LABEL_KIND, body[prediction.LABEL])


class ParseLabelFn(beam.DoFn):
    """Label messages -> join inputs, or dead letters naming the message."""

    def process(self, message: PubsubMessage) -> Iterable[JoinInput | beam.pvalue.TaggedOutput]:
        try:
            parsed = parse_label(message)
        except RejectedInput as rejected:
            yield beam.pvalue.TaggedOutput(DEAD_LETTERS, DeadLetter(
                message_ref(message_id_of(message)), LABEL_STAGE, rejected.error_type, str(rejected)))
            return
        yield parsed


def prediction_join_input(row: dict[str, Any]) -> JoinInput:
    """A stream prediction row -> ``(image_id, ("prediction", (label, model_version)))``."""
    return row[prediction.IMAGE_ID], (PREDICTION_KIND, (row[prediction.LABEL], row[prediction.MODEL_VERSION]))


class JoinLabelsFn(beam.DoFn):
    """Joins a prediction and its late label by image_id, with a processing-time timeout.

    Emits ``{"true_label", "label", "model_version"}`` rows (the prediction
    row's column names, so ``ConfusionCountsFn`` scores them).
    """

    PREDICTION_STATE = ReadModifyWriteStateSpec("prediction", PickleCoder())
    LABEL_STATE = ReadModifyWriteStateSpec("label", PickleCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.REAL_TIME)

    def __init__(self, timeout_secs: float):
        self._timeout_secs = timeout_secs

    def setup(self) -> None:
        self._joined = Metrics.counter(METRICS_NAMESPACE, JOINED_COUNTER)
        self._expired = Metrics.counter(METRICS_NAMESPACE, EXPIRED_COUNTER)

    def process(
        self,
        element: JoinInput,
        predicted=beam.DoFn.StateParam(PREDICTION_STATE),
        labeled=beam.DoFn.StateParam(LABEL_STATE),
        expiry=beam.DoFn.TimerParam(EXPIRY),
    ) -> Iterable[dict[str, Any]]:
        _, (kind, value) = element
        (predicted if kind == PREDICTION_KIND else labeled).write(value)
        guess, truth = predicted.read(), labeled.read()
        if guess is None or truth is None:
            expiry.set(time.time() + self._timeout_secs)
            return
        predicted.clear()
        labeled.clear()
        expiry.clear()
        self._joined.inc()
        yield {prediction.TRUE_LABEL: truth, prediction.LABEL: guess[0], prediction.MODEL_VERSION: guess[1]}

    @on_timer(EXPIRY)
    def expire(self, predicted=beam.DoFn.StateParam(PREDICTION_STATE),
               labeled=beam.DoFn.StateParam(LABEL_STATE)) -> Iterable[dict[str, Any]]:
        predicted.clear()
        labeled.clear()
        self._expired.inc()
        return []


@dataclasses.dataclass(frozen=True)
class EvaluationReport:
    """Accuracy of the predictions whose labels arrived since the previous report.

    Attributes:
      count: Labeled predictions scored.
      accuracy: Their accuracy (``model_lib.metrics``).
      per_class_recall: Recall per label over the model's full label list.
      model_versions: The versions that made them.
    """

    count: int
    accuracy: float
    per_class_recall: dict[str, float]
    model_versions: list[str]
    kind: str = "evaluation"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EvaluationReport":
        return cls(**json.loads(text))


class ScorePaneFn(beam.DoFn):
    """Confusion counts of one pane -> an ``EvaluationReport``, and an alert below the threshold."""

    ALERTS = "alerts"

    def __init__(self, labels: Sequence[str], accuracy_threshold: float | None):
        self._labels = list(labels)
        self._threshold = accuracy_threshold

    def process(self, counts: dict[str, Any]) -> Iterable[EvaluationReport | beam.pvalue.TaggedOutput]:
        confusion = counts["confusion"]
        if not confusion:
            return
        report = evaluation_report(counts, self._labels)
        versions = sorted({v for v in counts.get("versions", ())})
        result = EvaluationReport(
            count=report.count,
            accuracy=report.accuracy,
            per_class_recall={label: metrics.recall for label, metrics in report.per_class.items()},
            model_versions=versions,
        )
        yield result
        if self._threshold is not None and result.accuracy < self._threshold:
            yield beam.pvalue.TaggedOutput(self.ALERTS, DeadLetter(
                input_ref=f"evaluation of {result.count} labeled predictions", stage=EVAL_STAGE,
                error_type=ACCURACY_ALERT,
                message=f"accuracy {result.accuracy:.4f} < threshold {self._threshold}"))


class _VersionedConfusionCountsFn(ConfusionCountsFn):
    """``ConfusionCountsFn`` that also keeps the set of model versions scored."""

    def create_accumulator(self) -> dict[str, Any]:
        counts = super().create_accumulator()
        counts["versions"] = set()
        return counts

    def add_input(self, counts: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
        counts["versions"].add(row[prediction.MODEL_VERSION])
        return super().add_input(counts, row)

    def merge_accumulators(self, accumulators: Iterable[dict[str, Any]]) -> dict[str, Any]:
        accumulators = list(accumulators)
        merged = super().merge_accumulators(accumulators)
        merged["versions"] = set().union(*(a["versions"] for a in accumulators))
        return merged


class EvaluateWithLateLabels(beam.PTransform):
    """Stream prediction rows + label join inputs -> ``(EvaluationReport``s, alerts)``.

    Args:
      labels: The model's labels (every one is scored).
      timeout_secs: How long one side of the join waits for the other.
      interval_secs: Processing-time seconds between two reports (whole seconds).
      accuracy_threshold: Alert when a report's accuracy is below it (None: never).
    """

    def __init__(self, labels: Sequence[str], *, timeout_secs: float, interval_secs: int,
                 accuracy_threshold: float | None):
        super().__init__()
        self._labels = list(labels)
        self._timeout_secs = timeout_secs
        self._interval_secs = interval_secs
        self._threshold = accuracy_threshold

    def expand(self, inputs: tuple[beam.PCollection, beam.PCollection]):
        rows, labels = inputs
        keyed = rows | "KeyPredictions" >> beam.Map(prediction_join_input)
        scored = (
            (keyed, labels)
            | "MergeJoinInputs" >> beam.Flatten()
            | "JoinLabels" >> beam.ParDo(JoinLabelsFn(self._timeout_secs))
            | "PaneEveryInterval" >> beam.WindowInto(
                window.GlobalWindows(),
                trigger=trigger.Repeatedly(trigger.AfterProcessingTime(self._interval_secs)),
                accumulation_mode=trigger.AccumulationMode.DISCARDING)
            | "CountConfusions" >> beam.CombineGlobally(_VersionedConfusionCountsFn(None)).without_defaults()
            | "ScorePanes" >> beam.ParDo(ScorePaneFn(self._labels, self._threshold)).with_outputs(
                ScorePaneFn.ALERTS, main="reports")
        )
        return scored.reports, scored[ScorePaneFn.ALERTS]


def training_distribution(dataset_dir: str) -> dict[str, float]:
    """The training split's label distribution from the dataset's ``dataset_info.json``."""
    info = DatasetInfo.read(published_dir(dataset_dir))
    counts = info.counts[info.split_names[0]].labels
    total = sum(counts.values())
    if total == 0:
        raise ValueError(f"{dataset_dir} has no training records to compare predictions with")
    return {label: counts.get(label, 0) / total for label in info.labels}


def total_variation(observed: dict[str, int], expected: dict[str, float]) -> float:
    """Half the L1 distance between the observed label frequencies and ``expected``."""
    total = sum(observed.values())
    if total == 0:
        return 0.0
    names = set(observed) | set(expected)
    return 0.5 * sum(abs(observed.get(n, 0) / total - expected.get(n, 0.0)) for n in names)


class DriftAlertFn(beam.DoFn):
    """Monitoring reports -> an alert when the predicted labels drift from the training distribution.

    A report of fewer than ``min_predictions`` predictions raises none: ten
    predictions drawn from ten balanced classes are 0.3 (median) to 0.5 (95th
    percentile) total variation from that very distribution by chance alone,
    so a quiet interval would alert; at 100 predictions 99.9% of such samples
    stay under 0.22, below the job's default threshold of 0.3.
    """

    def __init__(self, expected: dict[str, float], threshold: float, min_predictions: int):
        self._expected = dict(expected)
        self._threshold = threshold
        self._min_predictions = min_predictions

    def process(self, report: MonitoringReport) -> Iterable[DeadLetter]:
        if report.count < self._min_predictions:
            return
        distance = total_variation(report.label_counts, self._expected)
        if distance > self._threshold:
            yield DeadLetter(
                input_ref=f"{report.count} predictions reported at {report.emitted_at}", stage=EVAL_STAGE,
                error_type=DRIFT_ALERT,
                message=f"predicted-label distribution is {distance:.3f} (total variation) from training's; "
                        f"threshold {self._threshold}; counts {report.label_counts}")


def evaluation_message(report: EvaluationReport) -> bytes:
    return report.to_json().encode("utf-8")
