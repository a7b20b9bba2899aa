"""The ``dataset_info.json`` summary: counts, rejections, parameters, fingerprint.

It also checks the accounting invariant ``written + rejected == read``, where
``read`` counts manifest data rows and ``rejected`` counts dead letters about
images (rating-file rejections are reported separately: they are not images).
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import json
import logging
from typing import Any, Iterable

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from schemas import dataset, layout
from schemas.dead_letter import DeadLetter
from transforms.manifests import STAGES

_LOGGER = logging.getLogger(__name__)

# Dead letters from these stages are about rating rows, not images.
RATING_STAGES = (STAGES["ratings"],)
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
) -> dict[str, Any]:
    """Assembles the summary dict from the pipeline's side inputs."""
    per_split: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (split, label), count in sorted(split_label_counts):
        per_split[split][label] = count
    split_names = parameters["split_names"]
    counts = {name: {"total": sum(per_split.get(name, {}).values()), "labels": per_split.get(name, {})}
              for name in split_names}
    rejected_images = {reason: count for (kind, reason), count in sorted(rejection_counts) if kind == "images"}
    rejected_ratings = {reason: count for (kind, reason), count in sorted(rejection_counts) if kind == "ratings"}
    written = sum(c["total"] for c in counts.values())
    rejected = sum(rejected_images.values())
    return {
        "counts": counts,
        "labels": labels,
        "rejected": rejected_images,
        "rejected_ratings": rejected_ratings,
        "accounting": {"read": read, "written": written, "rejected": rejected, "balanced": written + rejected == read},
        "fingerprint": fingerprint,
        "image_size": parameters["image_size"],
        "channels": parameters["channels"],
        "resize_method": parameters["resize_method"],
        "image_format": parameters["image_format"],
        "parameters": parameters,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


class WriteJsonFn(beam.DoFn):
    """Writes one dict as a pretty JSON file (local or gs://)."""

    def __init__(self, path: str):
        self._path = path

    def process(self, info: dict[str, Any]) -> Iterable[dict[str, Any]]:
        accounting = info["accounting"]
        if not accounting["balanced"]:
            _LOGGER.error("accounting does not balance: %s", accounting)
        with FileSystems.create(self._path) as handle:
            handle.write(json.dumps(info, indent=2, sort_keys=True).encode("utf-8"))
        yield info


class WriteDatasetInfo(beam.PTransform):
    """Summarizes records and dead letters into ``OUTPUT/dataset_info.json``."""

    def __init__(self, output_dir: str, parameters: dict[str, Any]):
        super().__init__()
        self._output_dir = output_dir
        self._parameters = parameters

    def expand(self, inputs: dict[str, beam.PCollection]) -> beam.PCollection[dict[str, Any]]:
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
            | "WriteDatasetInfo" >> beam.ParDo(WriteJsonFn(layout.join(self._output_dir, layout.DATASET_INFO_FILE)))
        )
