"""Reading listed image files into memory, the step before decoding, shared by every job that reads images.

Reading and decoding are two steps on purpose: decoding runs under
``with_exception_handling`` (a bad image becomes a dead letter), while this
read step has none, so ``StorageUnavailable`` (storage still failing after the
retries of ``transforms.file_reads``) fails the job instead of turning every
remaining image into a dead letter. Missing, empty and permanently unreadable
files are facts about the input and go to the ``dead_letters`` output.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas.dead_letter import DeadLetter
from transforms.dead_letters import METRICS_NAMESPACE, RejectedInput
from transforms.file_reads import DEFAULT_RETRY, RetryPolicy
from transforms.images import read_image_bytes


@dataclasses.dataclass(frozen=True)
class ImageFile:
    """A listed image (anything with ``uri`` and ``input_ref``) with its undecoded bytes."""

    listed: Any
    data: bytes

    @property
    def input_ref(self) -> str:
        return self.listed.input_ref


class ReadImageFilesFn(beam.DoFn):
    """Reads one listed image: element with ``uri`` -> ``ImageFile``, or a dead letter.

    Args:
      stage: The dead letters' stage.
      ref_attribute: The element attribute that names it in dead letters
        (``input_ref``, e.g. ``manifest.csv:12``, or ``uri``).
      retry: How transient storage errors are retried.
    """

    DEAD_LETTERS = "dead_letters"

    def __init__(self, stage: str, ref_attribute: str = "input_ref", retry: RetryPolicy = DEFAULT_RETRY):
        self._stage = stage
        self._ref_attribute = ref_attribute
        self._retry = retry

    def setup(self) -> None:
        self._bytes_read = Metrics.distribution(METRICS_NAMESPACE, "source_image_bytes")

    def process(self, listed: Any) -> Iterable[ImageFile | beam.pvalue.TaggedOutput]:
        try:
            data = read_image_bytes(listed.uri, self._retry)
        except RejectedInput as rejected:
            ref = getattr(listed, self._ref_attribute)
            yield beam.pvalue.TaggedOutput(
                self.DEAD_LETTERS, DeadLetter(ref, self._stage, rejected.error_type, str(rejected)))
            return
        self._bytes_read.update(len(data))
        yield ImageFile(listed, data)
