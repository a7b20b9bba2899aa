"""Continuous evaluation of a prediction stream: late ground-truth labels joined to predictions, and drift.

Labels arrive later than predictions, on their own subscription, as JSON
``{"image_id": "...", "label": "..."}``. ``JoinLabelsFn`` is a stateful join
keyed by image_id: whichever side comes first waits in state until the other
arrives, or until ``timeout_secs`` of processing time pass (then it expires, is
counted, and the state is freed), so unmatched predictions never pile up. The
join runs in the global window (a label is published later than its
prediction, usually in a later window); each joined pair is emitted at the
*prediction's* event time, so it is scored in the window its prediction
belongs to however late the label came.

Joined pairs are scored per fixed event-time window
(``transforms.stream_monitoring.report_windows``: early, on-time and late
accumulating panes) by the project's one metrics implementation:
``transforms.prediction_eval``'s confusion counts and ``model_lib.metrics``
(accuracy, per-class recall over the model's full label list), the numbers
batch_predict's eval.json and train's metrics.json report. On the local
runner a pair whose label came late is behind the watermark, so a window
keeps taking pairs for ``timeout_secs`` beyond the predictions' own allowed
lateness: a label joined within the timeout always reaches its window's
report. On the portable runners (Dataflow, Flink) the join's processing-time
timer holds the watermark at the waiting element's timestamp (Beam's
default for such timers), so there the window's on-time pane waits until its
predictions are joined or expired, and early panes give the partial figures. A
report whose accuracy is below the threshold raises an alert naming its
window and pane (a later pane of the same window that is still below raises
it again).

Drift: each monitoring report's predicted-label distribution is compared with
the training split's label distribution from the dataset's
``dataset_info.json`` by total variation distance (half the L1 distance, 0 =
same, 1 = disjoint); above the threshold raises an alert, likewise per pane.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Iterable, Sequence

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import TimestampedValue

from schemas import prediction
from schemas.dataset_info import DatasetInfo
from schemas.dead_letter import DeadLetter
from schemas.publication import published_dir
from schemas.stream_prediction import EVENT_TIME, EvaluationReport, MonitoringReport
from transforms.dead_letters import METRICS_NAMESPACE, RejectedInput
from transforms.image_inputs import message_ref
from transforms.prediction_eval import ConfusionCountsFn, evaluation_report
from transforms.pubsub_io import MALFORMED_MESSAGE, message_id_of
from transforms.stream_monitoring import report_windows, window_fields

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
    """A stream prediction row -> ``(image_id, ("prediction", (label, model_version, event_time)))``.

    ``event_time`` is epoch seconds: the joined pair is emitted at it.
    """
    return row[prediction.IMAGE_ID], (PREDICTION_KIND, (
        row[prediction.LABEL], row[prediction.MODEL_VERSION], row[EVENT_TIME].timestamp()))


class JoinLabelsFn(beam.DoFn):
    """Joins a prediction and its late label by image_id, with a processing-time timeout.

    Emits ``{"true_label", "label", "model_version"}`` rows (the prediction
    row's column names, so ``ConfusionCountsFn`` scores them), each at its
    prediction's event time.
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
    ) -> Iterable[TimestampedValue]:
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
        label, model_version, event_time = guess
        yield TimestampedValue(
            {prediction.TRUE_LABEL: truth, prediction.LABEL: label, prediction.MODEL_VERSION: model_version},
            event_time)

    @on_timer(EXPIRY)
    def expire(self, predicted=beam.DoFn.StateParam(PREDICTION_STATE),
               labeled=beam.DoFn.StateParam(LABEL_STATE)) -> Iterable[dict[str, Any]]:
        predicted.clear()
        labeled.clear()
        self._expired.inc()
        return []


class ScorePaneFn(beam.DoFn):
    """Confusion counts of one window, as of one pane -> an ``EvaluationReport``, and an alert below the threshold."""

    ALERTS = "alerts"

    def __init__(self, labels: Sequence[str], accuracy_threshold: float | None):
        self._labels = list(labels)
        self._threshold = accuracy_threshold

    def process(self, counts: dict[str, Any], window_=beam.DoFn.WindowParam,
                pane=beam.DoFn.PaneInfoParam) -> Iterable[EvaluationReport | beam.pvalue.TaggedOutput]:
        confusion = counts["confusion"]
        if not confusion:
            return
        report = evaluation_report(counts, self._labels)
        versions = sorted({v for v in counts.get("versions", ())})
        result = EvaluationReport(
            **window_fields(window_, pane),
            count=report.count,
            accuracy=report.accuracy,
            per_class_recall={label: metrics.recall for label, metrics in report.per_class.items()},
            model_versions=versions,
        )
        yield result
        if self._threshold is not None and result.accuracy < self._threshold:
            yield beam.pvalue.TaggedOutput(self.ALERTS, DeadLetter(
                input_ref=f"evaluation of {result.count} labeled predictions in {window_name(result)}",
                stage=EVAL_STAGE,
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
      timeout_secs: How long one side of the join waits for the other (processing time).
      window_secs: Event-time length of an evaluation window (whole seconds).
      refresh_secs: Processing-time seconds between two early (or two late) panes of a window.
      allowed_lateness_secs: The predictions' allowed lateness; windows take joined pairs
        ``timeout_secs`` longer (see the module docstring).
      accuracy_threshold: Alert when a report's accuracy is below it (None: never).
    """

    def __init__(self, labels: Sequence[str], *, timeout_secs: float, window_secs: int, refresh_secs: int,
                 allowed_lateness_secs: int, accuracy_threshold: float | None):
        super().__init__()
        self._labels = list(labels)
        self._timeout_secs = timeout_secs
        self._windows = report_windows(window_secs, refresh_secs=refresh_secs,
                                       allowed_lateness_secs=allowed_lateness_secs + math.ceil(timeout_secs))
        self._threshold = accuracy_threshold

    def expand(self, inputs: tuple[beam.PCollection, beam.PCollection]):
        rows, labels = inputs
        keyed = rows | "KeyPredictions" >> beam.Map(prediction_join_input)
        scored = (
            (keyed, labels)
            | "MergeJoinInputs" >> beam.Flatten()
            | "JoinLabels" >> beam.ParDo(JoinLabelsFn(self._timeout_secs))
            | "WindowByPredictionTime" >> self._windows
            | "CountConfusions" >> beam.CombineGlobally(_VersionedConfusionCountsFn(None)).without_defaults()
            | "ScorePanes" >> beam.ParDo(ScorePaneFn(self._labels, self._threshold)).with_outputs(
                ScorePaneFn.ALERTS, main="reports")
        )
        return scored.reports, scored[ScorePaneFn.ALERTS]


def window_name(report: MonitoringReport | EvaluationReport) -> str:
    """How an alert names its report's window and pane: ``window [START, END) (PANE pane)``."""
    return f"window [{report.window_start}, {report.window_end}) ({report.pane} pane)"


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
                input_ref=f"{report.count} predictions in {window_name(report)}", stage=EVAL_STAGE,
                error_type=DRIFT_ALERT,
                message=f"predicted-label distribution is {distance:.3f} (total variation) from training's; "
                        f"threshold {self._threshold}; counts {report.label_counts}")


def evaluation_message(report: EvaluationReport) -> bytes:
    return report.to_json().encode("utf-8")
