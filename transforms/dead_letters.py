"""Turning failures into dead-letter records, counting them, and writing them next to a job's output.

Counting (``CountDeadLetters``) is separate from the sink, so every job
counts rejections the same way whatever it writes them to: batch jobs write
``rejected-*.jsonl`` files (``WriteDeadLetters``); stream_predict publishes
the same ``DeadLetter`` JSON to a Pub/Sub topic (``transforms.pubsub_io``).
"""

from __future__ import annotations

from typing import Any, Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.runner import PipelineResult

from schemas import counters, layout
from schemas.dead_letter import DeadLetter
from schemas.publication import published_dir

METRICS_NAMESPACE = "vision_pipelines"


class RejectedInput(Exception):
    """Raised inside a step when an input is bad; carries the stable reason code.

    Steps raise it (rather than returning a sentinel) so that Beam's
    ``with_exception_handling`` routes the element to the dead-letter output.
    """

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type

    def __repr__(self) -> str:
        # with_exception_handling forwards repr(exception), not the exception:
        # this form lets dead_letter_from_failure recover the reason code.
        return f"{self.error_type}{_REASON_SEPARATOR}{self}"


_REASON_SEPARATOR = ": "


def _reason_and_message(exc_type: Any, exc_value: Any) -> tuple[str, str]:
    """The stable reason code and message of a failure forwarded by Beam."""
    if isinstance(exc_value, BaseException):
        return getattr(exc_value, "error_type", type(exc_value).__name__), str(exc_value)
    if isinstance(exc_type, type) and issubclass(exc_type, RejectedInput):
        reason, _, message = str(exc_value).partition(_REASON_SEPARATOR)
        return reason, message
    return getattr(exc_type, "__name__", str(exc_type)), str(exc_value)


def dead_letter_from_failure(failure: tuple[Any, tuple[Any, ...]], stage: str) -> DeadLetter:
    """Converts a ``with_exception_handling`` failure ``(element, (type, repr, traceback))``.

    The element's ``input_ref`` attribute (or ``str(element)``) names the input,
    so dead letters never carry image bytes.
    """
    element, exc_info = failure
    error_type, message = _reason_and_message(exc_info[0], exc_info[1])
    input_ref = getattr(element, "input_ref", None)
    if input_ref is None and isinstance(element, tuple) and element:
        input_ref = getattr(element[-1], "input_ref", None) or str(element[0])
    return DeadLetter(
        input_ref=str(input_ref if input_ref is not None else element)[:2000],
        stage=stage,
        error_type=error_type,
        message=message[:2000],
    )


class ToDeadLetters(beam.PTransform):
    """Maps the failures of one ``with_exception_handling`` step to DeadLetters."""

    def __init__(self, stage: str):
        super().__init__()
        self._stage = stage

    def expand(self, failures: beam.PCollection) -> beam.PCollection[DeadLetter]:
        return failures | beam.Map(dead_letter_from_failure, stage=self._stage)


class _CountRejectionsFn(beam.DoFn):
    """Counts dead letters per error type in Beam metrics, then passes them on."""

    def process(self, letter: DeadLetter) -> Iterable[DeadLetter]:
        Metrics.counter(METRICS_NAMESPACE, f"rejected_{letter.error_type}").inc()
        Metrics.counter(METRICS_NAMESPACE, counters.REJECTED).inc()
        yield letter


class CountDeadLetters(beam.PTransform):
    """Counts dead letters (``rejected`` and ``rejected_<error_type>``) and passes them on to a sink."""

    def expand(self, letters: beam.PCollection[DeadLetter]) -> beam.PCollection[DeadLetter]:
        return letters | "CountRejections" >> beam.ParDo(_CountRejectionsFn())


def counter_total(result: PipelineResult, name: str) -> int:
    """Sum of one of the jobs' counters (``read``, ``rejected``, ...) over every step reporting it.

    Jobs check their accounting (read = written + rejected) from these totals.
    """
    counters = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE).with_name(name))["counters"]
    return int(sum(c.committed if c.committed is not None else c.attempted for c in counters))


def dead_letter_to_json(letter: DeadLetter) -> str:
    return letter.to_json()


class WriteDeadLetters(beam.PTransform):
    """Counts and writes a job's dead letters as ``OUTPUT/rejected-*.jsonl``.

    The file is written even when nothing was rejected (one empty shard), so
    readers can tell "no rejections" from "the job did not run".

    Returns the names of the written files, complete only once they are
    finalized: the signal ``transforms.publishing.PublishWhenWritten`` waits for.
    """

    def __init__(self, output_dir: str):
        super().__init__()
        self._output_dir = output_dir

    def expand(self, letters: beam.PCollection[DeadLetter]) -> beam.PCollection[str]:
        return (
            letters
            | "CountDeadLetters" >> CountDeadLetters()
            | "FormatDeadLetters" >> beam.Map(dead_letter_to_json)
            | "WriteRejected"
            >> beam.io.WriteToText(
                layout.rejected_prefix(self._output_dir),
                file_name_suffix=layout.REJECTED_SUFFIX,
                # 0: the runner picks (a shard per bundle), so writing scales with the workers; a fixed count
                # sends every letter to that many writers. Empty input still gets one empty shard.
                num_shards=0,
            )
        )


def read_dead_letters(output_dir: str) -> list[DeadLetter]:
    """Reads back every dead letter a job wrote (local or gs://) in the run ``output_dir`` publishes."""
    from apache_beam.io.filesystems import FileSystems

    letters: list[DeadLetter] = []
    for match in FileSystems.match([layout.rejected_pattern(published_dir(output_dir))])[0].metadata_list:
        with FileSystems.open(match.path) as handle:
            for line in handle.read().decode("utf-8").splitlines():
                if line.strip():
                    letters.append(DeadLetter.from_json(line))
    return letters
