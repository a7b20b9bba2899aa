"""Reading the images an inference job runs on, validated and keyed.

Three kinds of input become the same ``(image_id, ImageInput)`` elements:

- ``manifest``: CSV files of ``uri[,label]`` rows (``transforms.manifests``);
- ``images``: a glob of image files, local or gs://;
- ``dataset``: create_dataset TFRecords (a dataset directory or a shard glob),
  which also carry the label and split.

Every image is read and fully decoded once here, before batching, so a
missing, empty, non-image or truncated file becomes a dead letter with a
stable reason instead of failing the batch it would have joined. Ids come
from ``transforms.splitting.image_id_for_uri``, the function create_dataset
uses, so predictions join back to dataset records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import posixpath
from typing import Iterable

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from google.protobuf.message import DecodeError

from schemas import dataset, layout
from schemas.dead_letter import DeadLetter
from transforms import images
from transforms.dead_letters import METRICS_NAMESPACE, RejectedInput, ToDeadLetters
from transforms.manifests import ManifestRow, ReadCsvRows, expand_patterns
from transforms.model_handler import ImageInput, KeyedImage
from transforms.splitting import image_id_for_uri

INPUT_KINDS = ("manifest", "images", "dataset")
LOAD_STAGE = "load_image"
PARSE_STAGE = "parse_dataset_record"
CORRUPT_RECORD = "corrupt_record"
READ_COUNTER = "read"
DEAD_LETTERS = "dead_letters"


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What to read.

    Attributes:
      pattern: Manifest file(s), image glob, or TFRecord shard glob.
      kind: One of ``INPUT_KINDS``.
      max_pixels: Images with more pixels are rejected before decoding.
    """

    pattern: str
    kind: str
    max_pixels: int = images.ImageSpec.max_pixels

    def __post_init__(self) -> None:
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"input kind must be one of {INPUT_KINDS}. Received `kind={self.kind}`")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive. Received `max_pixels={self.max_pixels}`")

    @classmethod
    def resolve(cls, input_flag: str, kind: str = "auto", max_pixels: int = images.ImageSpec.max_pixels) -> "InputSpec":
        """Builds a spec from ``--input``/``--input_format``, detecting the kind for ``auto``.

        A create_dataset directory (it holds dataset_info.json) is read as all of
        its shards.
        """
        if kind != "auto":
            return cls(input_flag, kind, max_pixels)
        lowered = input_flag.lower()
        if lowered.endswith(".csv"):
            return cls(input_flag, "manifest", max_pixels)
        if lowered.endswith((layout.TFRECORD_SUFFIX, ".tfrecord")):
            return cls(input_flag, "dataset", max_pixels)
        if FileSystems.exists(layout.join(input_flag, layout.DATASET_INFO_FILE)):
            return cls(layout.join(input_flag, f"*-*-of-*{layout.TFRECORD_SUFFIX}"), "dataset", max_pixels)
        return cls(input_flag, "images", max_pixels)


def image_source(uri: str) -> str:
    """The directory an image was read from: its URI without the file name."""
    return posixpath.dirname(uri) if "://" in uri else FileSystems.split(uri)[0]


def _rejection(input_ref: str, stage: str, rejected: RejectedInput) -> beam.pvalue.TaggedOutput:
    return beam.pvalue.TaggedOutput(
        DEAD_LETTERS, DeadLetter(input_ref=input_ref, stage=stage, error_type=rejected.error_type, message=str(rejected))
    )


class FileToRowFn(beam.DoFn):
    """Turns a matched image file into an unlabeled manifest row, counting it as read."""

    def __init__(self):
        self._read = Metrics.counter(METRICS_NAMESPACE, READ_COUNTER)

    def process(self, metadata: FileMetadata) -> Iterable[ManifestRow]:
        self._read.inc()
        yield ManifestRow(uri=metadata.path, label="", input_ref=metadata.path)


@beam.typehints.with_output_types(KeyedImage, dead_letters=DeadLetter)
class LoadImageFn(beam.DoFn):
    """Reads and validates one listed image: ``ManifestRow`` -> ``(image_id, ImageInput)``.

    Rejected images go to the ``dead_letters`` output with their reason.
    """

    def __init__(self, max_pixels: int):
        self._max_pixels = max_pixels

    def process(self, row: ManifestRow) -> Iterable[KeyedImage | beam.pvalue.TaggedOutput]:
        try:
            data = images.read_image_bytes(row.uri)
            images.check_image(data, self._max_pixels)
        except RejectedInput as rejected:
            yield _rejection(row.uri, LOAD_STAGE, rejected)
            return
        image_id = image_id_for_uri(row.uri)
        yield image_id, ImageInput(
            image_id=image_id, uri=row.uri, image_bytes=data, label=row.label or None, source=image_source(row.uri)
        )


@beam.typehints.with_output_types(KeyedImage, dead_letters=DeadLetter)
class ParseDatasetRecordFn(beam.DoFn):
    """Parses and validates one create_dataset tf.Example: bytes -> ``(image_id, ImageInput)``."""

    def __init__(self, max_pixels: int):
        self._max_pixels = max_pixels
        self._read = Metrics.counter(METRICS_NAMESPACE, READ_COUNTER)

    def process(self, serialized: bytes) -> Iterable[KeyedImage | beam.pvalue.TaggedOutput]:
        self._read.inc()
        try:
            record = dataset.DATASET_RECORD.from_tf_example(serialized)
        except (DecodeError, IndexError, UnicodeDecodeError) as error:
            # No URI survives an unparseable record: name it by its content hash.
            ref = f"tfrecord:sha256={hashlib.sha256(serialized).hexdigest()[:16]}"
            yield _rejection(ref, PARSE_STAGE, RejectedInput(CORRUPT_RECORD, f"not a dataset record: {error}"))
            return
        uri = record[dataset.URI]
        try:
            images.check_image(record[dataset.IMAGE], self._max_pixels)
        except RejectedInput as rejected:
            yield _rejection(uri, PARSE_STAGE, rejected)
            return
        image_id = record[dataset.IMAGE_ID]
        yield image_id, ImageInput(
            image_id=image_id,
            uri=uri,
            image_bytes=record[dataset.IMAGE],
            label=record[dataset.LABEL] or None,
            split=record[dataset.SPLIT] or None,
            source=image_source(uri),
        )


class ReadImageInputs(beam.PTransform):
    """Reads, validates and keys the images of an ``InputSpec``.

    Returns ``(images, dead_letters)``: ``(image_id, ImageInput)`` elements and
    ``DeadLetter``s. Every input counts once in the ``read`` metric and comes
    out in exactly one of the two.
    """

    def __init__(self, spec: InputSpec):
        super().__init__()
        self._spec = spec

    def expand(self, pbegin: beam.pvalue.PBegin):
        spec = self._spec
        upstream_letters: list[beam.PCollection] = []
        if spec.kind == "dataset":
            parsed = (
                pbegin
                | "ReadDatasetRecords" >> beam.io.ReadFromTFRecord(spec.pattern)
                | "ParseDatasetRecords"
                >> beam.ParDo(ParseDatasetRecordFn(spec.max_pixels))
                .with_exception_handling(main_tag="images")
                .with_outputs(DEAD_LETTERS)
            )
            stage = PARSE_STAGE
        else:
            if spec.kind == "manifest":
                rows, manifest_letters = pbegin | "ReadManifest" >> ReadCsvRows(
                    expand_patterns([spec.pattern]), "manifest"
                )
                upstream_letters.append(manifest_letters)
            else:
                rows = (
                    pbegin
                    | "MatchImageFiles" >> fileio.MatchFiles(spec.pattern, fileio.EmptyMatchTreatment.DISALLOW)
                    | "ListImageFiles" >> beam.ParDo(FileToRowFn())
                    | "RedistributeFiles" >> beam.Reshuffle()
                )
            parsed = rows | "LoadImages" >> beam.ParDo(LoadImageFn(spec.max_pixels)).with_exception_handling(
                main_tag="images"
            ).with_outputs(DEAD_LETTERS)
            stage = LOAD_STAGE
        unexpected = parsed.bad | "DescribeReadFailures" >> ToDeadLetters(stage)
        letters = (*upstream_letters, parsed[DEAD_LETTERS], unexpected) | "MergeReadDeadLetters" >> beam.Flatten()
        return parsed.images, letters
