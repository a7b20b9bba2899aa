"""Reading image manifests (``uri,label``) and rater files (``uri,rater,label``).

Manifests follow the "Practical ML for Computer Vision" book's all_data.csv:
headerless ``uri,label`` rows; a header row (first field ``uri``) is also
accepted. Relative paths are resolved against the manifest's directory, local
or gs://. Files are decoded line by line: a row that is not UTF-8
(``invalid_utf8``) or does not parse (``malformed_row``) becomes a dead letter
naming ``file:line`` and counts as one row read; it is never dropped
silently, and it never costs the other rows of its file.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import posixpath
from typing import Iterable

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from schemas import counters
from schemas.dead_letter import DeadLetter
from transforms.dead_letters import METRICS_NAMESPACE, RejectedInput
from transforms.file_reads import DEFAULT_RETRY, RetryPolicy, read_file_bytes
from transforms.splitting import normalize_uri

MALFORMED_ROW = "malformed_row"
INVALID_UTF8 = "invalid_utf8"
UNREADABLE_MANIFEST = "unreadable_manifest"
STAGES = {"manifest": counters.READ_MANIFEST_STAGE, "ratings": counters.READ_RATINGS_STAGE}


@dataclasses.dataclass(frozen=True)
class ManifestRow:
    """One image listed in a manifest; ``label`` is empty when the row has none."""

    uri: str
    label: str
    input_ref: str


@dataclasses.dataclass(frozen=True)
class Rating:
    """One rater's label for one image."""

    uri: str
    rater: str
    label: str
    input_ref: str


def expand_patterns(patterns: list[str]) -> list[str]:
    """Expands globs (local or gs://) to sorted files, failing before launch on no match."""
    files: list[str] = []
    for pattern, result in zip(patterns, FileSystems.match(patterns)):
        matched = sorted(m.path for m in result.metadata_list)
        if not matched:
            raise FileNotFoundError(f"no file matches {pattern!r}")
        files.extend(matched)
    return sorted(set(files))


_UTF8_BOM = b"\xef\xbb\xbf"


def _base_dir(path: str) -> str:
    return posixpath.dirname(path) if "://" in path else FileSystems.split(path)[0]


def _is_header(fields: list[str], first: str) -> bool:
    return bool(fields) and fields[0].strip().lower() == first


class ParseCsvFileFn(beam.DoFn):
    """Parses one manifest or ratings file into rows and dead letters.

    ``kind`` is ``manifest`` (``uri[,label]``) or ``ratings`` (``uri,rater,label``).
    A file that cannot be read at all (a directory, permission denied) is one
    ``unreadable_manifest`` dead letter; when storage keeps failing after the
    retries, ``StorageUnavailable`` fails the job.
    """

    DEAD_LETTERS = "dead_letters"

    def __init__(self, kind: str, retry: RetryPolicy = DEFAULT_RETRY):
        if kind not in ("manifest", "ratings"):
            raise ValueError(f"kind must be manifest or ratings. Received `kind={kind}`")
        self._kind = kind
        self._retry = retry
        self._stage = STAGES[kind]
        self._read = Metrics.counter(METRICS_NAMESPACE, counters.READ if kind == "manifest" else counters.RATINGS_READ)

    def process(self, path: str) -> Iterable[ManifestRow | Rating | beam.pvalue.TaggedOutput]:
        try:
            data = read_file_bytes(path, self._retry)
        except RejectedInput as rejected:
            yield beam.pvalue.TaggedOutput(
                self.DEAD_LETTERS, DeadLetter(path, self._stage, UNREADABLE_MANIFEST, str(rejected)))
            return
        base_dir = _base_dir(path)
        for line_number, raw_line in enumerate(data.removeprefix(_UTF8_BOM).splitlines(), start=1):
            ref = f"{path}:{line_number}"
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                self._read.inc()
                yield beam.pvalue.TaggedOutput(self.DEAD_LETTERS, DeadLetter(
                    ref, self._stage, INVALID_UTF8, f"not UTF-8 text: {error}"))
                continue
            if not line.strip():
                continue
            try:
                fields = next(csv.reader(io.StringIO(line), strict=True))
            except csv.Error as error:
                self._read.inc()
                yield self._malformed(ref, f"not valid CSV: {error}")
                continue
            if line_number == 1 and _is_header(fields, "uri"):
                continue
            self._read.inc()
            yield from self._to_record(fields, ref, base_dir)

    def _to_record(self, fields: list[str], ref: str, base_dir: str):
        fields = [f.strip() for f in fields]
        if self._kind == "manifest":
            if len(fields) not in (1, 2) or not fields[0]:
                yield self._malformed(ref, f"expected `uri,label`, got {len(fields)} fields: {fields!r}"[:500])
                return
            label = fields[1] if len(fields) == 2 else ""
            yield ManifestRow(uri=normalize_uri(fields[0], base_dir), label=label, input_ref=ref)
        else:
            if len(fields) != 3 or not fields[0] or not fields[2]:
                yield self._malformed(ref, f"expected `uri,rater,label`, got {fields!r}"[:500])
                return
            yield Rating(uri=normalize_uri(fields[0], base_dir), rater=fields[1], label=fields[2], input_ref=ref)

    def _malformed(self, ref: str, message: str) -> beam.pvalue.TaggedOutput:
        return beam.pvalue.TaggedOutput(self.DEAD_LETTERS, DeadLetter(ref, self._stage, MALFORMED_ROW, message))


class ReadCsvRows(beam.PTransform):
    """Reads manifest or ratings files; returns ``(rows, dead_letters)``.

    Each file is parsed by one worker (manifests are small next to their
    images), then rows are redistributed so image loading runs in parallel.
    """

    def __init__(self, files: list[str], kind: str, retry: RetryPolicy = DEFAULT_RETRY):
        super().__init__()
        self._files = files
        self._kind = kind
        self._retry = retry

    def expand(self, pbegin: beam.pvalue.PBegin):
        parsed = (
            pbegin
            | "ListFiles" >> beam.Create(self._files)
            | "ParseRows" >> beam.ParDo(ParseCsvFileFn(self._kind, self._retry)).with_outputs(
                ParseCsvFileFn.DEAD_LETTERS, main="rows")
        )
        rows = parsed.rows | "RedistributeRows" >> beam.Reshuffle()
        return rows, parsed[ParseCsvFileFn.DEAD_LETTERS]
