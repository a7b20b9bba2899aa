"""The prediction message stream_predict publishes for every input message (and its BigQuery row).

The same prediction fields as batch_predict's ``PREDICTION_RECORD`` (label,
top-k, model_version), plus what a stream needs to join and measure: the
Pub/Sub message id of the input, a digest of its content (the same for a
message published twice, or redelivered: the BigQuery sink's de-duplication
key and insert id), its event time (the input's publish time) and the
processing time, so end-to-end latency is their difference.

Also the two reports stream_predict publishes to its metrics topic, each about
one event-time window ``[window_start, window_end)`` of event time (the
inputs' publish time) and one pane of it: ``MonitoringReport`` (what was
predicted) and ``EvaluationReport`` (how right it was, on late labels). Panes
accumulate: a window's later pane covers everything its earlier panes did, so
the report of a window is its latest pane (``latest_per_window``); ``pane``
says whether it came before the watermark passed the window's end
(``early``), when it did (``on_time``), or for data that arrived after
(``late``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterable, Protocol, TypeVar

from schemas import prediction
from schemas.fields import Field, RecordSchema
from schemas.warehouse import TableSpec

MESSAGE_ID = "message_id"
MESSAGE_DIGEST = "message_digest"
EVENT_TIME = "event_time"
PROCESSING_TIME = "processing_time"

# Attributes of every output and dead-letter message, so subscribers can filter without parsing.
IMAGE_ID_ATTRIBUTE = prediction.IMAGE_ID
MESSAGE_ID_ATTRIBUTE = MESSAGE_ID

STREAM_PREDICTION_RECORD = RecordSchema(
    name="stream_prediction",
    fields=(
        Field(prediction.IMAGE_ID, "string", "The image id the input message carried."),
        Field(MESSAGE_ID, "string", "Pub/Sub message id of the input message."),
        Field(MESSAGE_DIGEST, "string", "sha256 of the input message's data and attributes: equal for a message "
              "published twice, which a new message id does not tell apart."),
        Field(prediction.URI, "string", "The image's URI (json_uri messages) or pubsub:MESSAGE_ID."),
        Field(prediction.LABEL, "string", "Predicted label (the model's top-1 class)."),
        Field(prediction.LABEL_INDEX, "int64", "Position of the predicted label in the model's labels."),
        Field(prediction.SCORE, "float", "Probability of the predicted label."),
        Field(prediction.TOP_K_LABELS, "string", "The k most probable labels, most probable first.", repeated=True),
        Field(prediction.TOP_K_PROBABILITIES, "float", "Probabilities of top_k_labels, in the same order.",
              repeated=True),
        Field(prediction.MODEL_VERSION, "string", "model_version of the model that predicted."),
        Field(EVENT_TIME, "timestamp", "Publish time of the input message."),
        Field(PROCESSING_TIME, "timestamp", "When the prediction was made."),
    ),
)

STREAM_PREDICTIONS_TABLE = TableSpec(
    record=STREAM_PREDICTION_RECORD,
    default_table="stream_predictions",
    partition_field=EVENT_TIME,
    clustering_fields=(prediction.MODEL_VERSION, prediction.LABEL),
)


PANE_EARLY = "early"
PANE_ON_TIME = "on_time"
PANE_LATE = "late"
PANE_UNKNOWN = "unknown"  # A runner that does not say.
PANE_TIMINGS = (PANE_EARLY, PANE_ON_TIME, PANE_LATE, PANE_UNKNOWN)
MONITORING_KIND = "monitoring"
EVALUATION_KIND = "evaluation"


@dataclasses.dataclass(frozen=True)
class MonitoringReport:
    """What the predictions of one event-time window looked like, as of one pane.

    Attributes:
      window_start: ISO 8601 UTC start of the window (inclusive).
      window_end: ISO 8601 UTC end of the window (exclusive).
      pane: ``early``, ``on_time`` or ``late`` (``unknown`` where the runner does not say).
      pane_index: 0 for the window's first pane, then 1, 2, ...: the highest is the latest.
      emitted_at: ISO 8601 UTC time the report was made.
      count: Predictions of the window so far.
      label_counts: Predictions per predicted label.
      model_versions: Predictions per model_version.
      latency_p50_s, latency_p95_s, latency_p99_s: End-to-end latency percentiles, seconds.
      kind: ``monitoring``, telling it apart from an ``EvaluationReport`` on the same topic.
    """

    window_start: str
    window_end: str
    pane: str
    pane_index: int
    emitted_at: str
    count: int
    label_counts: dict[str, int]
    model_versions: dict[str, int]
    latency_p50_s: float
    latency_p95_s: float
    latency_p99_s: float
    kind: str = MONITORING_KIND

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MonitoringReport":
        return cls(**json.loads(text))


@dataclasses.dataclass(frozen=True)
class EvaluationReport:
    """Accuracy of one event-time window's predictions (by prediction time) whose labels arrived, as of one pane.

    Attributes:
      window_start, window_end, pane, pane_index: As in ``MonitoringReport``.
      count: Labeled predictions of the window scored so far.
      accuracy: Their accuracy (``model_lib.metrics``).
      per_class_recall: Recall per label over the model's full label list.
      model_versions: The versions that made them.
      kind: ``evaluation``.
    """

    window_start: str
    window_end: str
    pane: str
    pane_index: int
    count: int
    accuracy: float
    per_class_recall: dict[str, float]
    model_versions: list[str]
    kind: str = EVALUATION_KIND

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EvaluationReport":
        return cls(**json.loads(text))


def report_from_json(text: str | bytes) -> MonitoringReport | EvaluationReport:
    """A metrics-topic message body -> the report it is (by its ``kind``)."""
    body = json.loads(text)
    kinds = {MONITORING_KIND: MonitoringReport, EVALUATION_KIND: EvaluationReport}
    if body.get("kind") not in kinds:
        raise ValueError(f"a report's kind is one of {sorted(kinds)}. Received `kind={body.get('kind')}`")
    return kinds[body["kind"]](**body)


class _Pane(Protocol):
    window_start: str
    pane_index: int


Report = TypeVar("Report", bound=_Pane)


def latest_per_window(reports: Iterable[Report]) -> list[Report]:
    """The report of each window: its latest pane (panes accumulate), ordered by window start."""
    latest: dict[str, Report] = {}
    for report in reports:
        if report.window_start not in latest or report.pane_index > latest[report.window_start].pane_index:
            latest[report.window_start] = report
    return [latest[start] for start in sorted(latest)]
