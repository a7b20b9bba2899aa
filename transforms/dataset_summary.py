"""The ``dataset_info.json`` summary: counts, rejections, parameters, fingerprint.

The file is a ``schemas.dataset_info.DatasetInfo``. Its accounting records
the invariant ``written + rejected == read``, where ``read`` counts manifest
data rows and ``rejected`` counts dead letters about images (rating-file
rejections are reported separately: they are not images).
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import logging
from typing import Any, Iterable, Sequence

import apache_beam as beam

from schemas import counters, dataset
from schemas.dataset_info import Accounting, DatasetInfo, DatasetWarning, SplitCounts
from schemas.dead_letter import DeadLetter
from transforms.dataset_checks import dataset_warnings

_LOGGER = logging.getLogger(__name__)

# Dead letters from these stages are about rating rows, not images.
RATING_STAGES = (counters.READ_RATINGS_STAGE,)
_FINGERPRINT_MODULUS = 2**256


def record_digest(record: dict[str, Any]) -> int:
    text = f"{record[dataset.IMAGE_ID]}|{record[dataset.SHA256]}|{record[dataset.LABEL]}|{record[dataset.SPLIT]}"
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest(), "big")


class FingerprintFn(beam.CombineFn):
    """Order-independent fingerprint of a set of records (sum of digests mod 2^256).

    It does not depend on shard count, bundle order or runner, so two runs on
    the same inputs with the same parameters give the same fingerprint.
    """

    def create_accumulator(self) -> int:
        return 0

    def add_input(self, accumulator: int, digest: int) -> int:
        return (accumulator + digest) % _FINGERPRINT_MODULUS

    def merge_accumulators(self, accumulators: Iterable[int]) -> int:
        return sum(accumulators) % _FINGERPRINT_MODULUS

    def extract_output(self, accumulator: int) -> str:
        return f"{accumulator:064x}"


def split_and_label(record: dict[str, Any]) -> tuple[str, str]:
    return record[dataset.SPLIT], record[dataset.LABEL]


def rejection_key(letter: DeadLetter) -> tuple[str, str]:
    kind = "ratings" if letter.stage in RATING_STAGES else "images"
    return kind, letter.error_type


def build_dataset_info(
    _: Any,
    split_label_counts: list[tuple[tuple[str, str], int]],
    rejection_counts: list[tuple[tuple[str, str], int]],
    read: int,
    fingerprint: str,
    labels: list[str],
    parameters: dict[str, Any],
) -> DatasetInfo:
    """Assembles the ``DatasetInfo`` from the pipeline's side inputs.

    ``parameters`` are create_dataset's settings (``CreateDatasetConfig.parameters``):
    the split names and image settings are taken from them.
    """
    per_split: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (split, label), count in sorted(split_label_counts):
        per_split[split][label] = count
    split_names = list(parameters["split_names"])
    counts = {name: SplitCounts(total=sum(per_split.get(name, {}).values()), labels=per_split.get(name, {}))
              for name in split_names}
    rejected_images = {reason: count for (kind, reason), count in sorted(rejection_counts) if kind == "images"}
    rejected_ratings = {reason: count for (kind, reason), count in sorted(rejection_counts) if kind == "ratings"}
    warnings = dataset_warnings(counts, split_names, parameters["split_fractions"], labels, read)
    for warning in warnings:
        _LOGGER.warning("dataset: %s", warning.message)
    return DatasetInfo(
        counts=counts,
        split_names=split_names,
        labels=list(labels),
        rejected=rejected_images,
        rejected_ratings=rejected_ratings,
        accounting=Accounting(
            read=read, written=sum(c.total for c in counts.values()), rejected=sum(rejected_images.values())),
        fingerprint=fingerprint,
        image_size=parameters["image_size"],
        channels=parameters["channels"],
        resize_method=parameters["resize_method"],
        image_format=parameters["image_format"],
        parameters=parameters,
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        warnings=warnings,
    )


class WriteDatasetInfoFn(beam.DoFn):
    """Writes the ``DatasetInfo`` to ``output_dir/dataset_info.json`` whole or not at all.

    An unbalanced accounting is logged here for runs launched without the
    job's ``main`` (which exits non-zero on it), and written all the same: the
    file is the record of what went missing.
    """

    def __init__(self, output_dir: str):
        self._output_dir = output_dir

    def process(self, info: DatasetInfo) -> Iterable[DatasetInfo]:
        problem = info.accounting.mismatch()
        if problem:
            _LOGGER.error("accounting does not balance: %s", problem)
        info.write(self._output_dir)
        yield info


class WriteDatasetInfo(beam.PTransform):
    """Summarizes records and dead letters into ``OUTPUT/dataset_info.json``."""

    def __init__(self, output_dir: str, parameters: dict[str, Any]):
        super().__init__()
        self._output_dir = output_dir
        self._parameters = parameters

    def expand(self, inputs: dict[str, beam.PCollection]) -> beam.PCollection[DatasetInfo]:
        records, letters, read_rows, vocabulary = (
            inputs["records"], inputs["dead_letters"], inputs["read_rows"], inputs["vocabulary"])
        split_label_counts = records | "KeySplitAndLabel" >> beam.Map(split_and_label) | (
            "CountPerSplitAndLabel" >> beam.combiners.Count.PerElement())
        rejection_counts = letters | "KeyRejection" >> beam.Map(rejection_key) | (
            "CountPerReason" >> beam.combiners.Count.PerElement())
        read = read_rows | "CountRead" >> beam.combiners.Count.Globally()
        fingerprint = records | "DigestRecords" >> beam.Map(record_digest) | (
            "FingerprintRecords" >> beam.CombineGlobally(FingerprintFn()))
        return (
            records.pipeline
            | "StartSummary" >> beam.Create([None])
            | "BuildDatasetInfo" >> beam.Map(
                build_dataset_info,
                split_label_counts=beam.pvalue.AsList(split_label_counts),
                rejection_counts=beam.pvalue.AsList(rejection_counts),
                read=beam.pvalue.AsSingleton(read),
                fingerprint=beam.pvalue.AsSingleton(fingerprint),
                labels=beam.pvalue.AsSingleton(vocabulary),
                parameters=self._parameters,
            )
            | "WriteDatasetInfo" >> beam.ParDo(WriteDatasetInfoFn(self._output_dir))
        )


class DatasetWarningsError(RuntimeError):
    """``--strict`` and the finished dataset has warnings: nothing was published.

    It is raised inside the pipeline (``refuse_warnings``), where Beam
    rebuilds a step's exception from its message alone; ``warnings`` is
    filled in where the launching process raises it again.
    """

    def __init__(self, message: str, warnings: Sequence[DatasetWarning] = ()):
        super().__init__(message)
        self.warnings = list(warnings)

    @classmethod
    def of(cls, warnings: Sequence[DatasetWarning]) -> "DatasetWarningsError":
        return cls(f"{len(warnings)} dataset warning(s) with --strict; nothing was published", warnings)


def refuse_warnings(*, dataset_info: list[DatasetInfo], **_: list[Any]) -> None:
    """create_dataset's ``--strict`` check before publishing (a ``PublishWhenWritten`` check).

    Args:
      dataset_info: What ``WriteDatasetInfo`` returned: the one written ``DatasetInfo``.

    Raises:
      DatasetWarningsError: The dataset has warnings.
    """
    warnings = [warning for info in dataset_info for warning in info.warnings]
    if warnings:
        raise DatasetWarningsError.of(warnings)
