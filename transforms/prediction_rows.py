"""Prediction rows from model results: the one formatting batch_predict and stream_predict share.

A ``(key, PredictionResult)`` from ``transforms.model_handler.PredictImages``
(whose ``example`` is the ``ImageInput`` with its bytes emptied and whose
``inference`` is a ``ModelOutputs``) becomes a dict in the column order of
``schemas.prediction.PREDICTION_RECORD`` (batch) or
``schemas.stream_prediction.STREAM_PREDICTION_RECORD`` (streaming). Both take
label, score and top-k from the same ``prediction_fields``, so the two jobs
cannot disagree on what a prediction says. Nothing here loads TensorFlow.
"""

from __future__ import annotations

import datetime
import json
import time
from typing import Any, Callable, Iterable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import PredictionResult

from schemas import counters
from schemas import prediction as prediction_schema
from schemas import stream_prediction as stream_schema
from transforms.dead_letters import METRICS_NAMESPACE
from transforms.image_inputs import ImageInput

KeyedResult = tuple[str, PredictionResult]
LATENCY_MS_DISTRIBUTION = "end_to_end_latency_ms"
PREDICTED_LABEL_COUNTER_PREFIX = "predicted_label_"


def top_k(probabilities: np.ndarray, labels: Sequence[str], k: int) -> tuple[list[str], list[float]]:
    """The k most probable labels and their probabilities; ties go to the lower index."""
    order = np.argsort(-probabilities, kind="stable")[: max(0, k)]
    return [labels[i] for i in order], [float(probabilities[i]) for i in order]


def prediction_fields(result: PredictionResult, labels: Sequence[str], k: int) -> dict[str, Any]:
    """Label, label index, score, top-k and model_version of one result (the columns both records share)."""
    outputs = result.inference
    top_labels, top_probabilities = top_k(outputs.probabilities, labels, k)
    schema = prediction_schema
    return {
        schema.LABEL: outputs.label,
        schema.LABEL_INDEX: outputs.label_index,
        schema.SCORE: float(outputs.probabilities[outputs.label_index]),
        schema.TOP_K_LABELS: top_labels,
        schema.TOP_K_PROBABILITIES: top_probabilities,
        schema.MODEL_VERSION: result.model_id,
    }


def prediction_row(result: KeyedResult, labels: Sequence[str], k: int) -> dict[str, Any]:
    """A ``PREDICTION_RECORD`` row (dict in schema order) from a keyed result."""
    _, prediction = result
    image: ImageInput = prediction.example
    schema = prediction_schema
    row = {
        schema.IMAGE_ID: image.image_id,
        schema.URI: image.uri,
        schema.TRUE_LABEL: image.label,
        schema.SPLIT: image.split,
        schema.SOURCE: image.source,
        **prediction_fields(prediction, labels, k),
    }
    return {name: row[name] for name in schema.PREDICTION_RECORD.names}


def _utc(epoch_seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(epoch_seconds, tz=datetime.timezone.utc)


def stream_prediction_row(
    result: KeyedResult, labels: Sequence[str], k: int, *, processing_time: float
) -> dict[str, Any]:
    """A ``STREAM_PREDICTION_RECORD`` row from a keyed result of an image that came in a message.

    Args:
      result: The model's result; its example carries ``message_id``, ``message_digest`` and ``event_time``.
      labels: The model's labels.
      k: How many labels to keep.
      processing_time: When the prediction was made, epoch seconds.

    Raises:
      ValueError: The image did not come from a message (no message id or event time).
    """
    _, prediction = result
    image: ImageInput = prediction.example
    if image.message_id is None or image.message_digest is None or image.event_time is None:
        raise ValueError(f"{image.uri} did not come from a Pub/Sub message (no message_id/message_digest/event_time)")
    row = {
        prediction_schema.IMAGE_ID: image.image_id,
        stream_schema.MESSAGE_ID: image.message_id,
        stream_schema.MESSAGE_DIGEST: image.message_digest,
        prediction_schema.URI: image.uri,
        **prediction_fields(prediction, labels, k),
        stream_schema.EVENT_TIME: _utc(image.event_time),
        stream_schema.PROCESSING_TIME: _utc(processing_time),
    }
    return {name: row[name] for name in stream_schema.STREAM_PREDICTION_RECORD.names}


def row_to_json(row: dict[str, Any]) -> str:
    """One row as a JSON object; timestamps as ISO 8601 UTC strings."""
    return json.dumps(row, default=_json_value)


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable: {value!r}")


class _FormatRowsFn(beam.DoFn):
    """Formats keyed results with a row function, counting each as predicted."""

    def __init__(self, labels: Sequence[str], top_k: int):
        self._labels = list(labels)
        self._top_k = min(top_k, len(self._labels))

    def setup(self) -> None:
        self._predicted = Metrics.counter(METRICS_NAMESPACE, counters.PREDICTED)

    def _format(self, result: KeyedResult) -> dict[str, Any]:
        raise NotImplementedError

    def process(self, result: KeyedResult) -> Iterable[dict[str, Any]]:
        self._predicted.inc()
        yield self._format(result)


class FormatPredictionFn(_FormatRowsFn):
    """``(key, PredictionResult)`` -> a ``PREDICTION_RECORD`` dict, counted as predicted."""

    def _format(self, result: KeyedResult) -> dict[str, Any]:
        return prediction_row(result, self._labels, self._top_k)


class FormatStreamPredictionFn(_FormatRowsFn):
    """``(key, PredictionResult)`` of a message's image -> a ``STREAM_PREDICTION_RECORD`` dict.

    Args:
      labels: The model's labels.
      top_k: How many labels to keep.
      clock: Returns the processing time (epoch seconds); ``time.time`` by default.
    """

    def __init__(self, labels: Sequence[str], top_k: int, clock: Callable[[], float] = time.time):
        super().__init__(labels, top_k)
        self._clock = clock

    def setup(self) -> None:
        super().setup()
        # Beam metrics for dashboards: end-to-end latency and predictions per label.
        self._latency_ms = Metrics.distribution(METRICS_NAMESPACE, LATENCY_MS_DISTRIBUTION)
        self._per_label = {label: Metrics.counter(METRICS_NAMESPACE, f"{PREDICTED_LABEL_COUNTER_PREFIX}{label}")
                           for label in self._labels}

    def _format(self, result: KeyedResult) -> dict[str, Any]:
        row = stream_prediction_row(result, self._labels, self._top_k, processing_time=self._clock())
        latency = row[stream_schema.PROCESSING_TIME] - row[stream_schema.EVENT_TIME]
        self._latency_ms.update(int(latency.total_seconds() * 1000))
        self._per_label[row[prediction_schema.LABEL]].inc()
        return row
