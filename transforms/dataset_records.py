"""From labeled image references to complete dataset records.

Steps: load and normalize each image (``LoadImages``), optionally merge
identical content (``DedupeByContent``), then give each image its id, split and
label index (``BuildRecords``). Each step sends bad inputs to dead letters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Literal

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas import counters, dataset
from schemas.dead_letter import DeadLetter
from transforms.dead_letters import METRICS_NAMESPACE, ToDeadLetters
from transforms.file_reads import DEFAULT_RETRY, RetryPolicy
from transforms.image_files import ImageFile, ReadImageFilesFn
from transforms.images import ImageSpec, NormalizedImage, content_sha256, normalize_image
from transforms.labeling import LabeledImage
from transforms.splitting import SplitSpec, image_id_for_content, image_id_for_uri, split_for_content

DedupeMode = Literal["uri", "content"]
DUPLICATE_CONTENT = "duplicate_content"
LOAD_STAGE = counters.LOAD_IMAGE_STAGE


@dataclasses.dataclass(frozen=True)
class LoadedImage:
    """A labeled image whose file was read and normalized."""

    uri: str
    label: str
    label_index: int
    input_ref: str
    sha256: str
    image: NormalizedImage


class DecodeImageFn(beam.DoFn):
    """Normalizes one image's bytes: ImageFile -> LoadedImage; failures raise ``RejectedInput``."""

    def __init__(self, spec: ImageSpec):
        self._spec = spec

    def process(self, image_file: ImageFile) -> Iterable[LoadedImage]:
        labeled, data = image_file.listed, image_file.data
        yield LoadedImage(
            uri=labeled.uri,
            label=labeled.label,
            label_index=labeled.label_index,
            input_ref=labeled.input_ref,
            sha256=content_sha256(data),
            image=normalize_image(data, self._spec),
        )


class LoadImages(beam.PTransform):
    """LabeledImage -> (LoadedImage, DeadLetter) with one dead letter per bad file.

    Transient storage errors are retried per ``retry``; if storage stays down
    the pipeline fails (``StorageUnavailable``) rather than losing images.
    """

    def __init__(self, spec: ImageSpec, retry: RetryPolicy = DEFAULT_RETRY):
        super().__init__()
        self._spec = spec
        self._retry = retry

    def expand(self, labeled: beam.PCollection[LabeledImage]):
        read = labeled | "ReadImageFiles" >> beam.ParDo(ReadImageFilesFn(LOAD_STAGE, retry=self._retry)).with_outputs(
            ReadImageFilesFn.DEAD_LETTERS, main="files")
        loaded, failed = read.files | "DecodeImages" >> beam.ParDo(
            DecodeImageFn(self._spec)).with_exception_handling()
        letters = (
            read[ReadImageFilesFn.DEAD_LETTERS],
            failed | "ImageFailuresToDeadLetters" >> ToDeadLetters(LOAD_STAGE),
        ) | "MergeImageDeadLetters" >> beam.Flatten()
        return loaded, letters


def key_by_content(image: LoadedImage) -> tuple[str, LoadedImage]:
    return image.sha256, image


class _KeepFirstByUriFn(beam.DoFn):
    """Keeps the copy with the smallest URI; the others become dead letters."""

    DEAD_LETTERS = "dead_letters"

    def process(self, element: tuple[str, Iterable[LoadedImage]]):
        _, copies = element
        ordered = sorted(copies, key=lambda image: image.uri)
        kept = ordered[0]
        yield kept
        for duplicate in ordered[1:]:
            note = "" if duplicate.label == kept.label else f" (its label {duplicate.label!r} was not used)"
            yield beam.pvalue.TaggedOutput(self.DEAD_LETTERS, DeadLetter(
                duplicate.input_ref, "dedupe_content", DUPLICATE_CONTENT,
                f"identical bytes to {kept.uri}, which is kept{note}"))


class DedupeByContent(beam.PTransform):
    """Merges images with identical bytes, so copies can never straddle splits."""

    def expand(self, loaded: beam.PCollection[LoadedImage]):
        results = (
            loaded
            | "KeyByContent" >> beam.Map(key_by_content)
            | "GroupIdenticalContent" >> beam.GroupByKey()
            | "KeepFirstCopy" >> beam.ParDo(_KeepFirstByUriFn()).with_outputs(
                _KeepFirstByUriFn.DEAD_LETTERS, main="kept")
        )
        return results.kept, results[_KeepFirstByUriFn.DEAD_LETTERS]


class BuildRecordFn(beam.DoFn):
    """LoadedImage -> dataset record dict (``schemas.dataset.DATASET_RECORD`` fields)."""

    def __init__(self, split_spec: SplitSpec, dedupe: DedupeMode):
        self._split_spec = split_spec
        self._dedupe = dedupe
        self._written = Metrics.counter(METRICS_NAMESPACE, counters.WRITTEN)

    def process(self, image: LoadedImage) -> Iterable[dict[str, Any]]:
        image_id = image_id_for_content(image.sha256) if self._dedupe == "content" else image_id_for_uri(image.uri)
        normalized = image.image
        self._written.inc()
        yield {
            dataset.IMAGE_ID: image_id,
            dataset.URI: image.uri,
            dataset.LABEL: image.label,
            dataset.LABEL_INDEX: image.label_index,
            dataset.SPLIT: split_for_content(image.sha256, self._split_spec),
            dataset.IMAGE: normalized.encoded,
            dataset.FORMAT: normalized.format,
            dataset.HEIGHT: normalized.height,
            dataset.WIDTH: normalized.width,
            dataset.CHANNELS: normalized.channels,
            dataset.ORIGINAL_HEIGHT: normalized.original_height,
            dataset.ORIGINAL_WIDTH: normalized.original_width,
            dataset.SHA256: image.sha256,
        }


class BuildRecords(beam.PTransform):
    """Assigns id and split; returns ``(records, dead_letters)``.

    The id follows ``dedupe`` (URI or content); the split always follows the
    content, so a dataset moved to another directory or bucket keeps every
    image in its split, and byte-identical copies share one split.
    """

    def __init__(self, split_spec: SplitSpec, dedupe: DedupeMode):
        super().__init__()
        self._split_spec = split_spec
        self._dedupe = dedupe

    def expand(self, images: beam.PCollection[LoadedImage]):
        records, failed = images | "AssignIdsAndSplits" >> beam.ParDo(
            BuildRecordFn(self._split_spec, self._dedupe)
        ).with_exception_handling()
        return records, failed | "RecordFailuresToDeadLetters" >> ToDeadLetters("build_record")
