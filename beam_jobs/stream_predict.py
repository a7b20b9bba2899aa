"""stream_predict: predictions for images arriving on Pub/Sub, one output message per input message.

Input (``--input_subscription projects/P/subscriptions/S`` or ``--input_topic
projects/P/topics/T``): messages in one of three formats (``--message_format``,
see ``transforms.pubsub_io``): ``json_uri`` ``{"image_id", "uri"}``,
``json_base64`` ``{"image_id", "image_base64"}``, or ``raw_bytes`` (the image,
with an ``image_id`` attribute). Event time is the publish time (or
``--timestamp_attribute``).

Outputs:
- ``--output_topic``: one JSON message per good input
  (``schemas.stream_prediction.STREAM_PREDICTION_RECORD``: image_id, message
  id, label, top-k, model_version, event and processing time), with
  ``image_id`` and ``message_id`` attributes;
- optionally ``--metrics_topic``: ``MonitoringReport`` JSONs (counts per label
  and model version, latency p50/p95/p99) per fixed event-time window of
  ``--monitoring_interval_secs`` (``window_start``/``window_end``; panes early
  every ``--report_refresh_secs``, on time, and late for data up to
  ``--allowed_lateness_secs`` behind; a window's latest pane is its report:
  ``schemas.stream_prediction``), and the same as Beam metrics
  (``end_to_end_latency_ms``, ``predicted_label_*``);
- with ``--labels_subscription`` (late ground truth), ``EvaluationReport``s
  (accuracy, per-class recall) per event-time window of
  ``--eval_interval_secs`` to ``--metrics_topic``, each label scored in its
  prediction's window; with ``--dataset_dir``, drift of each monitoring
  window's predicted labels from the training distribution
  (``transforms.streaming_eval``); alerts below ``--accuracy_alert_threshold``
  / above ``--drift_alert_threshold``;
- ``--dead_letter_topic``: one ``DeadLetter`` JSON per malformed message,
  unreadable or oversized image or failed inference (naming the message as
  ``pubsub:MESSAGE_ID``), and an alert for every model version refused;
- optionally ``--bigquery_table P.D.T``: the same rows by streaming inserts,
  one per input message content (``message_digest``) within
  ``--bigquery_dedup_secs``: a redelivered message, or the same message
  published twice, makes one row (``transforms.bigquery_inserts``); the
  output topic still has one message per input message.
Every message comes out on exactly one of the two topics: read = predicted +
rejected in the job's Beam metrics.

The model is ``--model_dir``: an export, or a directory whose ``CURRENT``
pointer names one (train's ``best/``). The pointer is re-read at most every
``--model_refresh_secs`` per worker process; a newly named export is loaded,
checked and switched to without a restart (``transforms.model_refresh``).

Nothing on the hot path limits parallelism: messages are redistributed right
after the read and every later step is stateless per element (or, with
``--max_batch_duration_secs`` > 0, batched per worker process). The side
branches that keep state (the BigQuery de-duplication, the labels join) key
it by message digest or image id, so it spreads over the workers too. On
DataflowRunner the job defaults to Streaming Engine and throughput-based
autoscaling (``--max_num_workers`` caps it).

Example:
  vision-pipelines stream-predict --model_dir gs://bucket/model/best \\
      --input_subscription projects/P/subscriptions/images \\
      --output_topic projects/P/topics/predictions --dead_letter_topic projects/P/topics/predictions-dlq \\
      --runner DataflowRunner --project P --region R --temp_location gs://bucket/tmp --max_num_workers 10
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from typing import Any

import apache_beam as beam
from apache_beam.io.gcp.pubsub import ReadFromPubSub, WriteToPubSub
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, StandardOptions, WorkerOptions
from apache_beam.runners.runner import PipelineResult

from schemas import counters
from schemas.redaction import redacted_console
from schemas.stream_prediction import MESSAGE_DIGEST, STREAM_PREDICTIONS_TABLE
from transforms import streaming_eval
from transforms.bigquery_inserts import DEFAULT_DEDUP_SECS, InsertRowsWithIds
from transforms.dead_letters import counter_total
from transforms.inference_options import ModelConfig, ModelOptions
from transforms.inference_preconditions import check_model_dir
from transforms.model_handler import PredictImages
from transforms.model_refresh import ALERTS, RefreshingImageModelHandler, WatchModelPointerFn
from transforms.prediction_rows import FormatStreamPredictionFn
from transforms.pubsub_io import MESSAGE_FORMATS, PublishDeadLetters, PublishRows, ReadImageMessages
from transforms.runner_policy import (
    is_dry_run,
    make_pipeline_options,
    report_dry_run,
    report_usage_error,
    require_flags,
    tolerate_shared_flags,
)
from transforms.stream_monitoring import MonitorPredictions, report_message
from transforms.streaming_eval import (
    DriftAlertFn,
    EvaluateWithLateLabels,
    ParseLabelFn,
    evaluation_message,
    training_distribution,
)

_LOGGER = logging.getLogger(__name__)

DEFAULT_MODEL_REFRESH_SECS = 60.0
DEFAULT_DRIFT_MIN_PREDICTIONS = 100
DEFAULT_REPORT_REFRESH_SECS = 10
DEFAULT_ALLOWED_LATENESS_SECS = 600
DATAFLOW_AUTOSCALING = "THROUGHPUT_BASED"
_TOPIC_RE = re.compile(r"^projects/[^/]+/topics/[^/]+$")
_SUBSCRIPTION_RE = re.compile(r"^projects/[^/]+/subscriptions/[^/]+$")
_TABLE_RE = re.compile(r"^[A-Za-z0-9_.:-]+\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+$")


class StreamPredictOptions(ModelOptions):
    """The job's own flags (plus the model flags); every other flag is a standard Beam option."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        tolerate_shared_flags(parser)
        parser.add_argument("--input_subscription", default=None, help="projects/P/subscriptions/S to read.")
        parser.add_argument("--input_topic", default=None,
                            help="projects/P/topics/T to read through a temporary subscription (instead of "
                                 "--input_subscription).")
        parser.add_argument("--output_topic", default=None, help="projects/P/topics/T for predictions.")
        parser.add_argument("--dead_letter_topic", default=None,
                            help="projects/P/topics/T for dead letters and model alerts.")
        parser.add_argument("--bigquery_table", default=None,
                            help="Also stream the predictions into this PROJECT.DATASET.TABLE.")
        parser.add_argument("--bigquery_dedup_secs", type=float, default=DEFAULT_DEDUP_SECS,
                            help="Seconds (processing time) a message's content is remembered, so the same "
                                 "message arriving again (redelivered or published twice) makes no second "
                                 f"BigQuery row (default {DEFAULT_DEDUP_SECS:g}; 0: only BigQuery's best-effort "
                                 "insertId de-duplication, about a minute).")
        parser.add_argument("--message_format", choices=MESSAGE_FORMATS, default="json_uri")
        parser.add_argument("--timestamp_attribute", default=None,
                            help="Message attribute holding the event time (default: the publish time).")
        parser.add_argument("--top_k", type=int, default=5, help="Labels with probabilities kept per image.")
        parser.add_argument("--max_batch_duration_secs", type=float, default=0.0,
                            help="0: batch what one bundle holds, never waiting; > 0: a batch waits up to this "
                                 "long for more messages (per worker process).")
        parser.add_argument("--metrics_topic", default=None,
                            help="projects/P/topics/T for monitoring reports (counts per label and model "
                                 "version, latency percentiles) per event-time window of "
                                 "--monitoring_interval_secs.")
        parser.add_argument("--monitoring_interval_secs", type=int, default=60,
                            help="Length of a monitoring window, seconds of event time (fixed windows of the "
                                 "inputs' publish time).")
        parser.add_argument("--report_refresh_secs", type=int, default=DEFAULT_REPORT_REFRESH_SECS,
                            help="Processing-time seconds between two early reports of a window still open, "
                                 "and from late data to the late report that counts it.")
        parser.add_argument("--allowed_lateness_secs", type=int, default=DEFAULT_ALLOWED_LATENESS_SECS,
                            help="How long after a window's end (in event time) late predictions still update "
                                 "its reports; evaluation windows wait --label_timeout_secs longer for labels.")
        parser.add_argument("--labels_subscription", default=None,
                            help='projects/P/subscriptions/S of late ground truth {"image_id", "label"}: '
                                 "joined to predictions and scored to --metrics_topic.")
        parser.add_argument("--label_timeout_secs", type=float, default=3600.0,
                            help="How long a prediction waits for its label (and a label for its prediction).")
        parser.add_argument("--eval_interval_secs", type=int, default=300,
                            help="Length of an evaluation window, seconds of event time: a label is scored in "
                                 "the window of its prediction's event time.")
        parser.add_argument("--accuracy_alert_threshold", type=float, default=None,
                            help="Alert on the dead-letter topic when a report's accuracy is below this.")
        parser.add_argument("--dataset_dir", default=None,
                            help="The model's training dataset: drift of the predicted labels is measured "
                                 "against its dataset_info.json.")
        parser.add_argument("--drift_alert_threshold", type=float, default=0.3,
                            help="Alert when the predicted-label distribution is further than this (total "
                                 "variation) from the training distribution.")
        parser.add_argument("--drift_min_predictions", type=int, default=DEFAULT_DRIFT_MIN_PREDICTIONS,
                            help="Least predictions a monitoring report must cover before it can raise a drift "
                                 f"alert (default {DEFAULT_DRIFT_MIN_PREDICTIONS}): a handful of predictions is "
                                 "far from any distribution by chance.")
        parser.add_argument("--model_refresh_secs", type=float, default=DEFAULT_MODEL_REFRESH_SECS,
                            help="Least seconds between two reads of --model_dir's CURRENT pointer.")


def _check_path(flag: str, value: str | None, pattern: re.Pattern, form: str) -> None:
    if value is not None and not pattern.match(value):
        raise ValueError(f"--{flag} must look like {form}. Received `{flag}={value}`")


@dataclasses.dataclass(frozen=True)
class StreamPredictConfig:
    """Validated job configuration, built once from the options."""

    model: ModelConfig
    input_subscription: str | None
    input_topic: str | None
    output_topic: str
    dead_letter_topic: str
    bigquery_table: str | None
    bigquery_dedup_secs: float
    metrics_topic: str | None
    monitoring_interval_secs: int
    report_refresh_secs: int
    allowed_lateness_secs: int
    labels_subscription: str | None
    label_timeout_secs: float
    eval_interval_secs: int
    accuracy_alert_threshold: float | None
    dataset_dir: str | None
    drift_alert_threshold: float
    drift_min_predictions: int
    message_format: str
    timestamp_attribute: str | None
    top_k: int
    max_batch_duration_secs: float
    model_refresh_secs: float

    @classmethod
    def from_options(cls, options: PipelineOptions) -> "StreamPredictConfig":
        flags = options.view_as(StreamPredictOptions)
        if (flags.input_subscription is None) == (flags.input_topic is None):
            raise ValueError("exactly one of --input_subscription and --input_topic is required")
        require_flags(flags, "output_topic", "dead_letter_topic")
        _check_path("input_subscription", flags.input_subscription, _SUBSCRIPTION_RE, "projects/P/subscriptions/S")
        for name in ("input_topic", "output_topic", "dead_letter_topic", "metrics_topic"):
            _check_path(name, getattr(flags, name), _TOPIC_RE, "projects/P/topics/T")
        _check_path("bigquery_table", flags.bigquery_table, _TABLE_RE, "PROJECT.DATASET.TABLE")
        if flags.bigquery_dedup_secs < 0:
            raise ValueError(f"--bigquery_dedup_secs must be >= 0. Received `bigquery_dedup_secs={flags.bigquery_dedup_secs}`")
        if flags.top_k < 1:
            raise ValueError(f"--top_k must be >= 1. Received `top_k={flags.top_k}`")
        if flags.max_batch_duration_secs < 0:
            raise ValueError("--max_batch_duration_secs must be >= 0. "
                             f"Received `max_batch_duration_secs={flags.max_batch_duration_secs}`")
        if flags.monitoring_interval_secs < 1:
            raise ValueError("--monitoring_interval_secs must be >= 1. "
                             f"Received `monitoring_interval_secs={flags.monitoring_interval_secs}`")
        if flags.report_refresh_secs < 1 or flags.allowed_lateness_secs < 0:
            raise ValueError("--report_refresh_secs must be >= 1 and --allowed_lateness_secs >= 0. Received "
                             f"`report_refresh_secs={flags.report_refresh_secs}`, "
                             f"`allowed_lateness_secs={flags.allowed_lateness_secs}`")
        _check_path("labels_subscription", flags.labels_subscription, _SUBSCRIPTION_RE, "projects/P/subscriptions/S")
        if (flags.labels_subscription or flags.dataset_dir) and not flags.metrics_topic:
            raise ValueError("--labels_subscription and --dataset_dir need --metrics_topic (their reports go there)")
        if flags.label_timeout_secs <= 0 or flags.eval_interval_secs < 1:
            raise ValueError("--label_timeout_secs must be > 0 and --eval_interval_secs >= 1. Received "
                             f"`label_timeout_secs={flags.label_timeout_secs}`, "
                             f"`eval_interval_secs={flags.eval_interval_secs}`")
        if flags.drift_min_predictions < 1:
            raise ValueError(f"--drift_min_predictions must be >= 1. Received "
                             f"`drift_min_predictions={flags.drift_min_predictions}`")
        if flags.model_refresh_secs <= 0:
            raise ValueError(f"--model_refresh_secs must be > 0. Received `model_refresh_secs={flags.model_refresh_secs}`")
        return cls(
            model=ModelConfig.from_options(options),
            input_subscription=flags.input_subscription,
            input_topic=flags.input_topic,
            output_topic=flags.output_topic,
            dead_letter_topic=flags.dead_letter_topic,
            bigquery_table=flags.bigquery_table,
            bigquery_dedup_secs=flags.bigquery_dedup_secs,
            metrics_topic=flags.metrics_topic,
            monitoring_interval_secs=flags.monitoring_interval_secs,
            report_refresh_secs=flags.report_refresh_secs,
            allowed_lateness_secs=flags.allowed_lateness_secs,
            labels_subscription=flags.labels_subscription,
            label_timeout_secs=flags.label_timeout_secs,
            eval_interval_secs=flags.eval_interval_secs,
            accuracy_alert_threshold=flags.accuracy_alert_threshold,
            dataset_dir=flags.dataset_dir,
            drift_alert_threshold=flags.drift_alert_threshold,
            drift_min_predictions=flags.drift_min_predictions,
            message_format=flags.message_format,
            timestamp_attribute=flags.timestamp_attribute,
            top_k=flags.top_k,
            max_batch_duration_secs=flags.max_batch_duration_secs,
            model_refresh_secs=flags.model_refresh_secs,
        )

    def make_handler(self) -> RefreshingImageModelHandler:
        model = self.model
        return RefreshingImageModelHandler(
            model.watched_dir,
            refresh_secs=self.model_refresh_secs,
            min_batch_size=model.min_batch_size,
            max_batch_size=model.max_batch_size,
            max_batch_bytes=model.max_batch_bytes,
            large_model=model.large_model,
            model_copies=model.model_copies,
            max_batch_duration_secs=self.max_batch_duration_secs,
        )


class StreamPredict(beam.PTransform):
    """The job as one composite: ``(image_id, ImageInput)`` of messages in; rows, dead letters and alerts out.

    Returns ``(rows, dead_letters, alerts)``: ``STREAM_PREDICTION_RECORD``
    dicts, ``DeadLetter``s of images the model could not take, and
    ``DeadLetter``s of refused model versions (not inputs, so not counted as
    rejected).
    """

    def __init__(self, handler: RefreshingImageModelHandler, top_k: int):
        super().__init__()
        self._handler = handler
        self._top_k = top_k

    def expand(self, images: beam.PCollection):
        watched = images | "WatchModelPointer" >> beam.ParDo(WatchModelPointerFn(self._handler)).with_outputs(
            ALERTS, main="images")
        predictions, predict_letters = watched.images | "PredictImages" >> PredictImages(self._handler)
        rows = predictions | "FormatPredictions" >> beam.ParDo(
            FormatStreamPredictionFn(list(self._handler.model_info.labels), self._top_k))
        return rows, predict_letters, watched[ALERTS]


def apply_dataflow_defaults(options: PipelineOptions) -> None:
    """On DataflowRunner: Streaming Engine and throughput-based autoscaling unless the user chose otherwise.

    ``--max_num_workers`` is left as given: it is the autoscaling cap.
    """
    if str(options.view_as(StandardOptions).runner).split(".")[-1] != "DataflowRunner":
        return
    options.view_as(GoogleCloudOptions).enable_streaming_engine = True
    worker = options.view_as(WorkerOptions)
    if not worker.autoscaling_algorithm:
        worker.autoscaling_algorithm = DATAFLOW_AUTOSCALING


def build_pipeline(pipeline: beam.Pipeline, config: StreamPredictConfig,
                   handler: RefreshingImageModelHandler) -> None:
    """Wires read, predict and the sinks into ``pipeline``."""
    images, read_letters = pipeline | "ReadImageMessages" >> ReadImageMessages(
        subscription=config.input_subscription, topic=config.input_topic, message_format=config.message_format,
        max_pixels=config.model.max_pixels, timestamp_attribute=config.timestamp_attribute)
    rows, predict_letters, alerts = images | "StreamPredict" >> StreamPredict(handler, config.top_k)
    _ = rows | "PublishPredictions" >> PublishRows(config.output_topic)
    if config.bigquery_table:
        _ = rows | "StreamToBigQuery" >> InsertRowsWithIds(config.bigquery_table, STREAM_PREDICTIONS_TABLE,
                                                           MESSAGE_DIGEST, config.bigquery_dedup_secs)
    alert_streams = [alerts]
    if config.metrics_topic:
        reports = rows | "MonitorPredictions" >> MonitorPredictions(
            config.monitoring_interval_secs, refresh_secs=config.report_refresh_secs,
            allowed_lateness_secs=config.allowed_lateness_secs)
        _ = reports | "FormatReports" >> beam.Map(report_message) | "PublishReports" >> WriteToPubSub(
            config.metrics_topic)
        if config.dataset_dir:
            alert_streams.append(reports | "DetectDrift" >> beam.ParDo(DriftAlertFn(
                training_distribution(config.dataset_dir), config.drift_alert_threshold,
                config.drift_min_predictions)))
    if config.labels_subscription:
        parsed = (
            pipeline
            | "ReadLabels" >> ReadFromPubSub(subscription=config.labels_subscription, with_attributes=True)
            | "ParseLabels" >> beam.ParDo(ParseLabelFn()).with_outputs(streaming_eval.DEAD_LETTERS, main="labels")
        )
        evaluations, eval_alerts = (rows, parsed.labels) | "EvaluateWithLateLabels" >> EvaluateWithLateLabels(
            handler.model_info.labels, timeout_secs=config.label_timeout_secs,
            window_secs=config.eval_interval_secs, refresh_secs=config.report_refresh_secs,
            allowed_lateness_secs=config.allowed_lateness_secs, accuracy_threshold=config.accuracy_alert_threshold)
        _ = evaluations | "FormatEvaluations" >> beam.Map(evaluation_message) | "PublishEvaluations" >> \
            WriteToPubSub(config.metrics_topic)
        alert_streams += [eval_alerts, parsed[streaming_eval.DEAD_LETTERS]]
    letters = (read_letters, predict_letters) | "MergeDeadLetters" >> beam.Flatten()
    _ = letters | "PublishDeadLetters" >> PublishDeadLetters(config.dead_letter_topic)
    # Alerts and bad label messages are not image inputs: published, not counted as rejected.
    _ = (alert_streams | "MergeAlerts" >> beam.Flatten()
         | "PublishAlerts" >> PublishDeadLetters(config.dead_letter_topic, count=False))


def run(argv: list[str] | None = None) -> PipelineResult:
    """Builds and starts the streaming job; returns at once with its (running) result."""
    options = make_pipeline_options(list(argv or []), job_options=StreamPredictOptions, streaming=True)
    config = StreamPredictConfig.from_options(options)
    apply_dataflow_defaults(options)
    handler = config.make_handler()
    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, config, handler)
    return pipeline.run()


def accounting(result: PipelineResult) -> dict[str, int]:
    """``read``, ``predicted`` and ``rejected`` so far, from the run's metrics."""
    return {name: counter_total(result, name) for name in (counters.READ, counters.PREDICTED, counters.REJECTED)}


def main(argv: list[str] | None = None) -> int:
    try:  # Flag and configuration errors end here, in one line and exit status 2, before anything runs.
        options = make_pipeline_options(list(argv or []), job_options=StreamPredictOptions, streaming=True)
        StreamPredictConfig.from_options(options)
        check_model_dir(options.view_as(StreamPredictOptions).model_dir)  # Exit 3: a directory that holds no model.
    except ValueError as error:
        return report_usage_error("stream-predict", error)
    result = run(argv)
    if is_dry_run(options):  # The Dataflow job was only built: nothing is running.
        return report_dry_run("stream-predict", options)
    _LOGGER.info("stream-predict is running; stop it with Ctrl-C (local) or drain it (Dataflow)")
    result.wait_until_finish()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    with redacted_console():
        sys.exit(main(sys.argv[1:]))
