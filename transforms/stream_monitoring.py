"""Periodic monitoring of a prediction stream: counts per label and model version, latency percentiles.

Every ``interval_secs`` of processing time, the rows predicted since the last
report are reduced with one ``CombineFn`` (combiner lifting pre-aggregates on
every worker, so this side branch costs a few counters and a bounded latency
sample and never slows the predictions) into one ``MonitoringReport``.
Latency is processing time minus event time (the input's publish time), the
figure the benchmark reports.

Why processing-time panes and not event-time windows: after RunInference's
bundle batching every prediction carries the end-of-global-window timestamp
(measured on the BundleBasedDirectRunner in Beam 2.77), so the event times of
in-flight rows are already behind the watermark and re-stamped rows would be
dropped as late by an event-time window. A processing-time trigger on the
global window reports everything, once.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import random
from typing import Any, Iterable

import apache_beam as beam
import numpy as np
from apache_beam.transforms import trigger, window

from schemas import prediction
from schemas import stream_prediction as stream_schema

LATENCY_SAMPLE = 2000  # Latencies kept per report; percentiles of a uniform sample of them.


@dataclasses.dataclass(frozen=True)
class MonitoringReport:
    """What the predictions made since the previous report looked like.

    Attributes:
      emitted_at: ISO 8601 UTC time the report was made.
      count: Predictions covered.
      label_counts: Predictions per predicted label.
      model_versions: Predictions per model_version.
      latency_p50_s, latency_p95_s, latency_p99_s: End-to-end latency percentiles, seconds.
    """

    emitted_at: str
    count: int
    label_counts: dict[str, int]
    model_versions: dict[str, int]
    latency_p50_s: float
    latency_p95_s: float
    latency_p99_s: float

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MonitoringReport":
        return cls(**json.loads(text))


@dataclasses.dataclass
class _Tally:
    count: int = 0
    labels: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    versions: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    latencies: list[float] = dataclasses.field(default_factory=list)


def latency_s(row: dict[str, Any]) -> float:
    """End-to-end latency of one stream prediction row, seconds."""
    return (row[stream_schema.PROCESSING_TIME] - row[stream_schema.EVENT_TIME]).total_seconds()


def _keep_sample(tally: _Tally, values: list[float]) -> None:
    tally.latencies.extend(values)
    if len(tally.latencies) > LATENCY_SAMPLE:
        tally.latencies = random.sample(tally.latencies, LATENCY_SAMPLE)


class TallyPredictionsFn(beam.CombineFn):
    """Stream prediction rows -> counts per label and version, and a latency sample."""

    def create_accumulator(self) -> _Tally:
        return _Tally()

    def add_input(self, tally: _Tally, row: dict[str, Any]) -> _Tally:
        tally.count += 1
        tally.labels[row[prediction.LABEL]] += 1
        tally.versions[row[prediction.MODEL_VERSION]] += 1
        _keep_sample(tally, [latency_s(row)])
        return tally

    def merge_accumulators(self, tallies: Iterable[_Tally]) -> _Tally:
        merged = _Tally()
        for tally in tallies:
            merged.count += tally.count
            merged.labels.update(tally.labels)
            merged.versions.update(tally.versions)
            _keep_sample(merged, tally.latencies)
        return merged

    def extract_output(self, tally: _Tally) -> _Tally:
        return tally


def monitoring_report(tally: _Tally) -> MonitoringReport:
    latencies = np.asarray(tally.latencies or [0.0])
    return MonitoringReport(
        emitted_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        count=tally.count,
        label_counts=dict(sorted(tally.labels.items())),
        model_versions=dict(sorted(tally.versions.items())),
        latency_p50_s=round(float(np.percentile(latencies, 50)), 4),
        latency_p95_s=round(float(np.percentile(latencies, 95)), 4),
        latency_p99_s=round(float(np.percentile(latencies, 99)), 4),
    )


def report_message(report: MonitoringReport) -> bytes:
    """The report as a Pub/Sub message body (its JSON)."""
    return report.to_json().encode("utf-8")


class MonitorPredictions(beam.PTransform):
    """Stream prediction rows -> a ``MonitoringReport`` about every ``interval_secs`` (processing time, whole seconds)."""

    def __init__(self, interval_secs: int):
        super().__init__()
        if interval_secs < 1:
            raise ValueError(f"interval_secs must be >= 1. Received `interval_secs={interval_secs}`")
        self._interval_secs = interval_secs

    def expand(self, rows: beam.PCollection[dict[str, Any]]) -> beam.PCollection[MonitoringReport]:
        return (
            rows
            | "PaneEveryInterval" >> beam.WindowInto(
                window.GlobalWindows(),
                trigger=trigger.Repeatedly(trigger.AfterProcessingTime(self._interval_secs)),
                accumulation_mode=trigger.AccumulationMode.DISCARDING)
            | "TallyPredictions" >> beam.CombineGlobally(TallyPredictionsFn()).without_defaults()
            | "DescribePane" >> beam.Map(monitoring_report)
        )
