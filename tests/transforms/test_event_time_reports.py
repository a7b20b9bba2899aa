"""Event-time windows of stream_predict's reports: predictions keep their event time through inference, and
monitoring and evaluation reports cover exactly the predictions (and late labels) of their window.

The windowing tests drive the real trigger machinery with ``TestStream`` on the
BundleBasedDirectRunner (the local streaming runner). Its processing clock starts
at the epoch, and Beam 2.77 names a pane fired by a processing-time timer early
or late by comparing that clock with the window's end, so each test first moves
the clock to the windows' time, as it is on a real stream.
"""

from __future__ import annotations

import datetime
from typing import Any, Iterable

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from schemas import prediction
from schemas.stream_prediction import (
    EVENT_TIME,
    PANE_EARLY,
    PANE_LATE,
    PANE_ON_TIME,
    PROCESSING_TIME,
    EvaluationReport,
    MonitoringReport,
    latest_per_window,
    report_from_json,
)
from transforms.image_inputs import ImageInput
from transforms.model_handler import ImageModelHandler, PredictImages
from transforms.stream_monitoring import MonitorPredictions, report_message
from transforms.streaming_eval import ACCURACY_ALERT, LABEL_KIND, EvaluateWithLateLabels

BASE = 1_700_000_000  # A window boundary (a multiple of WINDOW_SECS), 2023-11-14T22:13:20Z.
WINDOW_SECS = 10
REFRESH_SECS = 2
LABELS = ["a", "b", "c"]


def streaming_pipeline() -> TestPipeline:
    options = PipelineOptions(runner="BundleBasedDirectRunner")
    options.view_as(StandardOptions).streaming = True
    return TestPipeline(runner="BundleBasedDirectRunner", options=options)


def utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)


def row(image_id: str, label: str, event_time: float, latency_s: float = 0.5) -> dict[str, Any]:
    """A stream prediction row (the fields the reports read)."""
    return {prediction.IMAGE_ID: image_id, prediction.LABEL: label, prediction.MODEL_VERSION: "v1",
            EVENT_TIME: utc(event_time), PROCESSING_TIME: utc(event_time + latency_s)}


def at_event_time(rows: list[dict[str, Any]]) -> list[TimestampedValue]:
    return [TimestampedValue(r, r[EVENT_TIME].timestamp()) for r in rows]


def window_of(offset: int) -> tuple[str, str]:
    start = BASE + offset - offset % WINDOW_SECS
    return utc(start).isoformat(), utc(start + WINDOW_SECS).isoformat()


def test_monitoring_reports_count_each_windows_predictions_and_a_late_one_lands_in_its_window():
    first = [row("p0", "a", BASE + 1), row("p1", "b", BASE + 2, latency_s=1.5)]
    second = [row("p2", "a", BASE + 12)]
    late = row("p3", "b", BASE + 5, latency_s=10.0)
    stream = (TestStream()
              .advance_processing_time(BASE)
              .add_elements(at_event_time(first + second))
              .advance_processing_time(REFRESH_SECS + 1)  # Early panes of both windows.
              .advance_watermark_to(BASE + 15)  # The first window is on time; the second is still open.
              .advance_processing_time(12)
              .add_elements(at_event_time([late]))  # Behind the watermark, within the allowed lateness.
              .advance_processing_time(REFRESH_SECS + 1)
              .advance_watermark_to_infinity())
    with streaming_pipeline() as pipeline:
        reports = (pipeline | stream
                   | MonitorPredictions(WINDOW_SECS, refresh_secs=REFRESH_SECS, allowed_lateness_secs=60)
                   | beam.Map(report_message) | beam.Map(report_from_json))  # Through the message contract.
        assert_that(reports | beam.Map(pane_summary), equal_to([
            (window_of(0), PANE_EARLY, 0, 2, {"a": 1, "b": 1}),
            (window_of(0), PANE_ON_TIME, 1, 2, {"a": 1, "b": 1}),
            (window_of(0), PANE_LATE, 2, 3, {"a": 1, "b": 2}),  # Panes accumulate.
            (window_of(10), PANE_EARLY, 0, 1, {"a": 1}),
            (window_of(10), PANE_ON_TIME, 1, 1, {"a": 1}),
        ]), label="CheckPanes")
        assert_that(reports, each_window(final_summary, [
            (window_of(0), 3, {"v1": 3}, 1.5),  # Latencies 0.5, 1.5 and 10 s.
            (window_of(10), 1, {"v1": 1}, 0.5),
        ]), label="CheckWindowReports")


def each_window(summarize, expected: list[tuple]):
    """A matcher: ``summarize`` of each window's report (its latest pane) equals ``expected``."""

    def check(reports: list[Any]) -> None:
        got = [summarize(report) for report in latest_per_window(reports)]
        assert got == expected, f"{got} != {expected}"

    return check


def pane_summary(report: MonitoringReport) -> tuple:
    return (report.window_start, report.window_end), report.pane, report.pane_index, report.count, report.label_counts


def final_summary(report: MonitoringReport) -> tuple:
    return (report.window_start, report.window_end), report.count, report.model_versions, report.latency_p50_s


def test_late_labels_are_scored_in_their_predictions_window_with_the_accuracy_computed_by_hand():
    predicted = {  # image_id -> (predicted label, event time offset): three in the first window, two in the next.
        "i0": ("a", 1), "i1": ("b", 3), "i2": ("c", 8), "i3": ("a", 11), "i4": ("b", 19)}
    truth = {"i0": "a", "i1": "a", "i2": "c", "i3": "a", "i4": "c"}
    rows = [row(image_id, label, BASE + offset) for image_id, (label, offset) in predicted.items()]
    stream = (TestStream()
              .advance_processing_time(BASE)
              .add_elements([TimestampedValue(("row", r), r[EVENT_TIME].timestamp()) for r in rows])
              .advance_watermark_to(BASE + 30)  # Both windows closed before any label came.
              .advance_processing_time(40)
              .add_elements([TimestampedValue(("label", (image_id, (LABEL_KIND, label))), BASE + 40)
                             for image_id, label in truth.items()])
              .advance_processing_time(REFRESH_SECS + 1)
              .advance_watermark_to_infinity())
    with streaming_pipeline() as pipeline:
        inputs = pipeline | stream
        reports, alerts = (
            (inputs | "Rows" >> beam.FlatMap(tagged, "row"), inputs | "Labels" >> beam.FlatMap(tagged, "label"))
            | EvaluateWithLateLabels(LABELS, timeout_secs=3600, window_secs=WINDOW_SECS, refresh_secs=REFRESH_SECS,
                                     allowed_lateness_secs=0, accuracy_threshold=0.75))
        by_hand = {window_of(0): (3, 2 / 3), window_of(10): (2, 1 / 2)}
        assert_that(reports, each_window(scored_summary, [
            (window, count, pytest.approx(accuracy), PANE_LATE) for window, (count, accuracy) in by_hand.items()]),
            label="CheckWindowAccuracy")
        # Every pane below the threshold alerts (here the late pane and the closing one, both late).
        assert_that(alerts | beam.Map(lambda letter: (letter.error_type, letter.input_ref)), distinct_equal_to([
            (ACCURACY_ALERT, f"evaluation of {count} labeled predictions in window [{start}, {end}) (late pane)")
            for (start, end), (count, _) in by_hand.items()]), label="CheckAlerts")


def distinct_equal_to(expected: list[Any]):
    def check(actual: list[Any]) -> None:
        assert sorted(set(actual)) == sorted(expected), f"{sorted(set(actual))} != {sorted(expected)}"

    return check


def tagged(element: tuple[str, Any], kind: str) -> Iterable[Any]:
    if element[0] == kind:
        yield element[1]


def scored_summary(report: EvaluationReport) -> tuple:
    return (report.window_start, report.window_end), report.count, report.accuracy, report.pane


def test_predictions_leave_inference_at_their_inputs_event_time(trained_digits_model, digit_pngs):
    """Batches of 4 (one fails and is retried image by image): every prediction keeps its own timestamp."""
    inputs = [ImageInput(f"id{i}", f"pubsub:m{i}", data, message_id=f"m{i}", event_time=BASE + 7.25 * i)
              for i, data in enumerate(digit_pngs[:9])]
    inputs.insert(3, ImageInput("bad", "pubsub:bad", b"GIF89a-not-really", message_id="bad", event_time=BASE))
    handler = ImageModelHandler(trained_digits_model, min_batch_size=4, max_batch_size=4)
    with TestPipeline(runner="FnApiRunner") as pipeline:
        keyed = (pipeline | beam.Create([(image.image_id, image) for image in inputs])
                 | "AtEventTime" >> beam.Map(lambda kv: TimestampedValue(kv, kv[1].event_time)))
        predictions, _ = keyed | PredictImages(handler)
        assert_that(predictions | beam.Map(key_and_timestamp), equal_to(
            [(image.image_id, image.event_time) for image in inputs if image.image_id != "bad"]))


def key_and_timestamp(element: tuple[str, Any], timestamp=beam.DoFn.TimestampParam) -> tuple[str, float]:
    return element[0], float(timestamp)


@pytest.fixture(scope="module")
def digit_pngs(tmp_path_factory) -> list[bytes]:
    from model_lib import sample_data

    written = sample_data.write_digits(str(tmp_path_factory.mktemp("event_time_digits")), limit=9)
    with open(written.manifest) as handle:
        paths = [line.split(",")[0] for line in handle.read().splitlines()]
    files = []
    for path in paths:
        with open(path, "rb") as image:
            files.append(image.read())
    return files
