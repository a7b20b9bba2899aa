"""Reading the images an inference job runs on, validated and keyed.

Three kinds of input become the same ``(image_id, ImageInput)`` elements:

- ``manifest``: CSV files of ``uri[,label]`` rows (``transforms.manifests``);
- ``images``: a glob of image files, local or gs://;
- ``dataset``: create_dataset TFRecords (a dataset directory or a shard glob),
  which also carry the label and split.

Every image is read and fully decoded once here, before batching, so a
missing, empty, non-image or truncated file becomes a dead letter with a
stable reason instead of failing the batch it would have joined. A corrupt or
truncated TFRecord shard yields every record before the damage and one
``corrupt_tfrecord`` dead letter for its unreadable remainder. Transient
storage errors are retried (``transforms.file_reads``); storage that stays
down fails the job, because reading steps run without exception handling.
Ids come from ``transforms.splitting.image_id_for_uri``, the function
create_dataset uses, so predictions join back to dataset records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import posixpath
import time
import zlib
from typing import Iterable

import apache_beam as beam
from apache_beam.io import fileio, tfrecordio
from apache_beam.io.filesystem import CompressionTypes, FileMetadata
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from google.protobuf.message import DecodeError

from schemas import counters, dataset, layout
from schemas.dead_letter import DeadLetter
from schemas.publication import published_dir
from transforms import images
from transforms.dead_letters import METRICS_NAMESPACE, RejectedInput, ToDeadLetters
from transforms.file_reads import DEFAULT_RETRY, RetryPolicy, StorageUnavailable, is_transient, open_file
from transforms.image_files import ImageFile, ReadImageFilesFn
from transforms.image_inputs import KeyedImage, keyed_image
from transforms.manifests import ManifestRow, ReadCsvRows, expand_patterns
from transforms.splitting import image_id_for_uri

INPUT_KINDS = ("manifest", "images", "dataset")
LOAD_STAGE = counters.LOAD_IMAGE_STAGE
PARSE_STAGE = "parse_dataset_record"
READ_SHARD_STAGE = "read_dataset_shard"
CORRUPT_RECORD = "corrupt_record"
CORRUPT_TFRECORD = "corrupt_tfrecord"
READ_COUNTER = counters.READ
DEAD_LETTERS = "dead_letters"


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What to read.

    Attributes:
      pattern: Manifest file(s), image glob, or TFRecord shard glob.
      kind: One of ``INPUT_KINDS``.
      max_pixels: Images with more pixels are rejected before decoding.
      retry: How transient storage errors are retried.
    """

    pattern: str
    kind: str
    max_pixels: int = images.ImageSpec.max_pixels
    retry: RetryPolicy = DEFAULT_RETRY

    def __post_init__(self) -> None:
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"input kind must be one of {INPUT_KINDS}. Received `kind={self.kind}`")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive. Received `max_pixels={self.max_pixels}`")

    @classmethod
    def resolve(cls, input_flag: str, kind: str = "auto", max_pixels: int = images.ImageSpec.max_pixels) -> "InputSpec":
        """Builds a spec from ``--input``/``--input_format``, detecting the kind for ``auto``.

        A create_dataset directory (its published run holds dataset_info.json)
        is read as all of that run's shards.
        """
        if kind != "auto":
            return cls(input_flag, kind, max_pixels)
        lowered = input_flag.lower()
        if lowered.endswith(".csv"):
            return cls(input_flag, "manifest", max_pixels)
        if lowered.endswith((layout.TFRECORD_SUFFIX, ".tfrecord")):
            return cls(input_flag, "dataset", max_pixels)
        dataset_dir = published_dir(input_flag)
        if FileSystems.exists(layout.join(dataset_dir, layout.DATASET_INFO_FILE)):
            return cls(layout.join(dataset_dir, f"*-*-of-*{layout.TFRECORD_SUFFIX}"), "dataset", max_pixels)
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
class CheckImageFn(beam.DoFn):
    """Validates one image's bytes: ``ImageFile`` of a ``ManifestRow`` -> ``(image_id, ImageInput)``.

    Rejected images go to the ``dead_letters`` output with their reason.
    """

    def __init__(self, max_pixels: int):
        self._max_pixels = max_pixels

    def process(self, image_file: ImageFile) -> Iterable[KeyedImage | beam.pvalue.TaggedOutput]:
        row = image_file.listed
        try:
            keyed = keyed_image(image_id_for_uri(row.uri), row.uri, image_file.data, self._max_pixels,
                                label=row.label or None, source=image_source(row.uri))
        except RejectedInput as rejected:
            yield _rejection(row.uri, LOAD_STAGE, rejected)
            return
        yield keyed


# Beam's TFRecord framing (length, masked CRC32C, payload, CRC) is reused
# rather than re-implemented; ReadFromTFRecord itself cannot be used because it
# raises on the first damaged record and takes the whole job down with it.
_read_record = tfrecordio._TFRecordUtil.read_record
_encoded_num_bytes = tfrecordio._TFRecordUtil.encoded_num_bytes
# What a damaged shard raises: bad framing or CRC (ValueError), bad gzip data (zlib.error).
_CORRUPTION_ERRORS = (ValueError, zlib.error, EOFError)


class ReadShardRecordsFn(beam.DoFn):
    """Reads one TFRecord shard (gzip or not): ``FileMetadata`` -> serialized records.

    Records before any damage are emitted; the unreadable remainder of a
    damaged shard becomes one ``corrupt_tfrecord`` dead letter naming the file
    and the index and byte offset (in the uncompressed stream) of the first
    unreadable record, counted as one input read. A transient storage error
    reopens the shard and resumes after the last emitted record; storage that
    keeps failing raises ``StorageUnavailable`` (no exception handling here).
    """

    def __init__(self, retry: RetryPolicy):
        self._retry = retry
        self._read = Metrics.counter(METRICS_NAMESPACE, READ_COUNTER)

    def process(self, metadata: FileMetadata) -> Iterable[bytes | beam.pvalue.TaggedOutput]:
        path = metadata.path
        emitted = 0
        for attempt in range(1, self._retry.attempts + 1):
            try:
                for index, record in self._records(path):
                    if isinstance(record, beam.pvalue.TaggedOutput) or index >= emitted:
                        emitted = index + 1
                        yield record
                return
            except RejectedInput as rejected:  # The shard vanished or became unreadable after the match.
                self._read.inc()
                yield _rejection(path, READ_SHARD_STAGE, rejected)
                return
            except Exception as error:  # Classified here: only transient storage errors are retried.
                if not is_transient(error):
                    raise
                if attempt == self._retry.attempts:
                    raise StorageUnavailable(
                        f"reading {path} failed {attempt} times, last with {type(error).__name__}: {error}"
                    ) from error
                time.sleep(self._retry.delay_s(attempt))

    def _records(self, path: str) -> Iterable[tuple[int, bytes | beam.pvalue.TaggedOutput]]:
        """``(index, record)`` pairs, ending with ``(index, dead letter)`` if the shard is damaged."""
        with open_file(path, compression_type=CompressionTypes.AUTO) as handle:
            index, offset = 0, 0
            while True:
                try:
                    record = _read_record(handle)
                except _CORRUPTION_ERRORS as error:
                    self._read.inc()
                    message = (f"records {index} onwards of {path} are unreadable (from byte {offset} of the "
                               f"uncompressed stream): {error}")
                    yield index, _rejection(
                        f"{path}@record:{index}", READ_SHARD_STAGE, RejectedInput(CORRUPT_TFRECORD, message[:1000]))
                    return
                if record is None:
                    return
                yield index, record
                index += 1
                offset += _encoded_num_bytes(record)


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
            keyed = keyed_image(record[dataset.IMAGE_ID], uri, record[dataset.IMAGE], self._max_pixels,
                                label=record[dataset.LABEL] or None, split=record[dataset.SPLIT] or None,
                                source=image_source(uri))
        except RejectedInput as rejected:
            yield _rejection(uri, PARSE_STAGE, rejected)
            return
        yield keyed


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
            shards = (
                pbegin
                | "MatchDatasetShards" >> fileio.MatchFiles(spec.pattern, fileio.EmptyMatchTreatment.DISALLOW)
                | "ReadDatasetRecords" >> beam.ParDo(ReadShardRecordsFn(spec.retry)).with_outputs(
                    DEAD_LETTERS, main="records")
            )
            upstream_letters.append(shards[DEAD_LETTERS])
            parsed = (
                shards.records
                | "RedistributeRecords" >> beam.Reshuffle()
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
            files = rows | "ReadImageFiles" >> beam.ParDo(
                ReadImageFilesFn(LOAD_STAGE, ref_attribute="uri", retry=spec.retry)).with_outputs(
                DEAD_LETTERS, main="files")
            upstream_letters.append(files[DEAD_LETTERS])
            parsed = files.files | "LoadImages" >> beam.ParDo(CheckImageFn(spec.max_pixels)).with_exception_handling(
                main_tag="images"
            ).with_outputs(DEAD_LETTERS)
            stage = LOAD_STAGE
        unexpected = parsed.bad | "DescribeReadFailures" >> ToDeadLetters(stage)
        letters = (*upstream_letters, parsed[DEAD_LETTERS], unexpected) | "MergeReadDeadLetters" >> beam.Flatten()
        return parsed.images, letters
