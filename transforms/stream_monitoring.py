"""Monitoring of a prediction stream by event-time window: counts per label and model version, latency percentiles.

Predictions are grouped into fixed windows of event time (the input's publish
time, which ``transforms.model_handler.PredictImages`` restores as each
prediction's timestamp after batching) and each window is reduced with one
``CombineFn`` (combiner lifting pre-aggregates on every worker, so this side
branch costs a few counters and a bounded latency sample and never slows the
predictions) into ``MonitoringReport``s naming the window and pane.
Latency is processing time minus event time, the figure the benchmark reports.

When a window reports (``report_windows``, shared with continuous
evaluation): early panes every ``refresh_secs`` of processing time while the
window is open, so a report comes out promptly even where the watermark is
slow (the local runner moves its Pub/Sub watermark only when a pull returns,
up to 30 s on an idle input); the on-time pane when the watermark passes the
window's end; then a late pane ``refresh_secs`` after late data arrives, until
``allowed_lateness_secs`` past the end. Late data is normal here, not an
error: a prediction re-stamped after batching can be behind the watermark,
and a label joined later always is. Panes *accumulate*, so each report is the
whole window so far (percentiles and accuracy cannot be summed across panes)
and a window's latest pane replaces its earlier ones.

``pane`` in a report is the runner's pane timing. Beam 2.77's Python trigger
driver (the local runner's) decides early vs. late for a pane fired by a
processing-time timer by comparing the processing time, not the watermark,
with the window's end; the pane index and the counts are exact either way.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import random
from typing import Any, Iterable

import apache_beam as beam
import numpy as np
from apache_beam.transforms import trigger, window
from apache_beam.utils.windowed_value import PaneInfo, PaneInfoTiming

from schemas import prediction
from schemas import stream_prediction as stream_schema
from schemas.stream_prediction import MonitoringReport

LATENCY_SAMPLE = 2000  # Latencies kept per report; percentiles of a uniform sample of them.


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


_PANE_NAMES = {PaneInfoTiming.EARLY: stream_schema.PANE_EARLY, PaneInfoTiming.ON_TIME: stream_schema.PANE_ON_TIME,
               PaneInfoTiming.LATE: stream_schema.PANE_LATE}


def _utc(timestamp: Any) -> str:
    return datetime.datetime.fromtimestamp(float(timestamp), datetime.timezone.utc).isoformat()


def window_fields(window_: window.IntervalWindow, pane: PaneInfo) -> dict[str, Any]:
    """A report's window and pane fields (``window_start``, ``window_end``, ``pane``, ``pane_index``)."""
    return {"window_start": _utc(window_.start), "window_end": _utc(window_.end),
            "pane": _PANE_NAMES.get(pane.timing, stream_schema.PANE_UNKNOWN), "pane_index": pane.index}


def report_windows(window_secs: int, *, refresh_secs: int, allowed_lateness_secs: int) -> beam.WindowInto:
    """Fixed event-time windows of ``window_secs``, firing as the module docstring says (accumulating panes)."""
    for name, value in (("window_secs", window_secs), ("refresh_secs", refresh_secs)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1. Received `{name}={value}`")
    if allowed_lateness_secs < 0:
        raise ValueError(f"allowed_lateness_secs must be >= 0. Received `allowed_lateness_secs={allowed_lateness_secs}`")
    return beam.WindowInto(
        window.FixedWindows(window_secs),
        trigger=trigger.AfterWatermark(early=trigger.AfterProcessingTime(refresh_secs),
                                       late=trigger.AfterProcessingTime(refresh_secs)),
        accumulation_mode=trigger.AccumulationMode.ACCUMULATING,
        allowed_lateness=allowed_lateness_secs)


class DescribePaneFn(beam.DoFn):
    """One window's tally, as of one pane -> its ``MonitoringReport``."""

    def process(self, tally: _Tally, window_=beam.DoFn.WindowParam,
                pane=beam.DoFn.PaneInfoParam) -> Iterable[MonitoringReport]:
        if tally.count == 0:  # An on-time or final pane with nothing in it.
            return
        latencies = np.asarray(tally.latencies)
        yield MonitoringReport(
            **window_fields(window_, pane),
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
    """Stream prediction rows (at their event times) -> ``MonitoringReport``s per event-time window and pane.

    Args:
      window_secs: Event-time length of a window (whole seconds).
      refresh_secs: Processing-time seconds between two early (or two late) panes of a window.
      allowed_lateness_secs: How long after a window's end late predictions still update its report.
    """

    def __init__(self, window_secs: int, *, refresh_secs: int, allowed_lateness_secs: int):
        super().__init__()
        self._windows = report_windows(window_secs, refresh_secs=refresh_secs,
                                       allowed_lateness_secs=allowed_lateness_secs)

    def expand(self, rows: beam.PCollection[dict[str, Any]]) -> beam.PCollection[MonitoringReport]:
        return (
            rows
            | "WindowByEventTime" >> self._windows
            | "TallyPredictions" >> beam.CombineGlobally(TallyPredictionsFn()).without_defaults()
            | "DescribePanes" >> beam.ParDo(DescribePaneFn())
        )
