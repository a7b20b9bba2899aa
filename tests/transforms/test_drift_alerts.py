"""Drift alerts: a report far from the training distribution alerts, unless it covers too few predictions."""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from schemas.stream_prediction import PANE_ON_TIME, MonitoringReport
from transforms.streaming_eval import DRIFT_ALERT, DriftAlertFn

BALANCED = {str(digit): 0.1 for digit in range(10)}


def report(label_counts: dict[str, int]) -> MonitoringReport:
    return MonitoringReport(window_start="2026-12-02T00:00:00+00:00", window_end="2026-12-02T00:01:00+00:00",
                            pane=PANE_ON_TIME, pane_index=0,
                            emitted_at="2026-12-02T00:01:01+00:00", count=sum(label_counts.values()),
                            label_counts=label_counts, model_versions={"v1": sum(label_counts.values())},
                            latency_p50_s=0.1, latency_p95_s=0.2, latency_p99_s=0.3)


REPORTS = [
    report({"0": 6, "1": 4}),  # Total variation 0.8 from balanced, but over 10 predictions.
    report({"0": 120, "1": 80}),  # The same shift over 200 predictions.
    report({str(digit): 20 for digit in range(10)}),  # 200 balanced predictions.
]


@pytest.mark.parametrize("min_predictions, alerted", [(100, [200]), (1, [10, 200])])
def test_a_shifted_report_alerts_only_when_it_covers_enough_predictions(min_predictions, alerted):
    with TestPipeline(runner="FnApiRunner") as pipeline:
        alerts = (pipeline | beam.Create(REPORTS)
                  | beam.ParDo(DriftAlertFn(BALANCED, threshold=0.3, min_predictions=min_predictions)))
        # An alert's input_ref starts with the number of predictions its report covered, then names the window.
        assert_that(alerts | beam.Map(lambda letter: letter.input_ref.split(" in ", 1)[1]),
                    equal_to(["window [2026-12-02T00:00:00+00:00, 2026-12-02T00:01:00+00:00) (on_time pane)"]
                             * len(alerted)), label="CheckWindowNamed")
        assert_that(alerts | beam.Map(lambda letter: (letter.error_type, int(letter.input_ref.split()[0]))),
                    equal_to([(DRIFT_ALERT, count) for count in alerted]))
