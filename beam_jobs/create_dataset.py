"""create_dataset: labeled images -> validated, resized, split, sharded TFRecords.

Inputs: ``--manifest`` CSVs/globs of ``uri,label`` (local or gs://), optional
``--ratings`` CSVs of ``uri,rater,label`` and ``--labels_file``.

Outputs in ``--output_dir``: ``{split}-SSSSS-of-NNNNN.tfrecord.gz``,
``labels.txt``, ``schema.pbtxt``, ``transform_fn/`` and
``transformed_metadata/`` (tf.Transform over the train split),
``dataset_info.json`` and ``rejected-*.jsonl``.

Example:
  vision-pipelines create-dataset --manifest gs://bucket/all_data.csv \\
      --output_dir gs://bucket/dataset --image_size 224 \\
      --runner DataflowRunner --project P --region R --temp_location gs://bucket/tmp
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import sys
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

from model_lib.preprocessing import make_preprocessing_fn
from schemas import dataset, layout
from transforms.dataset_records import BuildRecords, DedupeByContent, LoadImages
from transforms.dataset_summary import WriteDatasetInfo
from transforms.dataset_writing import WriteDatasetSplits
from transforms.dead_letters import WriteDeadLetters
from transforms.images import ImageSpec
from transforms.labeling import AssignLabelIndices, DeriveVocabulary, ResolveLabels, VotePolicy
from transforms.manifests import ReadCsvRows, expand_patterns
from transforms.runner_policy import make_pipeline_options, report_usage_error, tolerate_shared_flags
from transforms.splitting import SplitSpec
from transforms.tft_analysis import AnalyzeAndWriteTransform


def package_version() -> str:
    """The installed vision-pipelines version (setup.py is its one source)."""
    try:
        return importlib.metadata.version("vision-pipelines")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


class CreateDatasetOptions(PipelineOptions):
    """The job's own flags; every other flag is a standard Beam option."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        tolerate_shared_flags(parser)
        parser.add_argument("--manifest", action="append", default=[],
                            help="CSV or glob of `uri,label` rows (repeatable; local or gs://).")
        parser.add_argument("--ratings", action="append", default=[],
                            help="CSV or glob of `uri,rater,label` rows from raters (repeatable).")
        parser.add_argument("--labels_file", default=None,
                            help="One label per line; without it the sorted labels of the labeled images are used.")
        parser.add_argument("--output_dir", default=None, help="Dataset directory (local or gs://).")
        parser.add_argument("--split", default="80,10,10", help="Split fractions or percentages.")
        parser.add_argument("--split_names", default="train,valid,test")
        parser.add_argument("--dedupe", choices=("uri", "content"), default="uri",
                            help="content: identical bytes at different URIs become one record.")
        parser.add_argument("--min_agreement", type=float, default=0.5,
                            help="Fraction of votes the winning label needs.")
        parser.add_argument("--vote_policy", choices=("reject", "keep_top"), default="reject",
                            help="What to do with ties and low agreement.")
        parser.add_argument("--image_size", type=int, default=224)
        parser.add_argument("--channels", type=int, choices=(1, 3), default=3)
        parser.add_argument("--resize_method", choices=("stretch", "pad", "crop"), default="stretch")
        parser.add_argument("--image_format", choices=("jpeg", "png"), default="jpeg")
        parser.add_argument("--jpeg_quality", type=int, default=90)
        parser.add_argument("--max_pixels", type=int, default=50_000_000,
                            help="Reject images with more source pixels (decompression-bomb guard).")
        parser.add_argument("--num_shards", type=int, default=0, help="Shards per split; 0 = automatic.")
        parser.add_argument("--skip_analysis", action="store_true",
                            help="Do not run tf.Transform analysis (no transform_fn/ is written).")


@dataclasses.dataclass(frozen=True)
class CreateDatasetConfig:
    """Validated job configuration, built once from the options."""

    manifests: list[str]
    ratings: list[str]
    labels: list[str] | None
    output_dir: str
    temp_dir: str
    split_spec: SplitSpec
    dedupe: str
    vote_policy: VotePolicy
    image_spec: ImageSpec
    num_shards: int
    analyze: bool

    @classmethod
    def from_options(cls, options: PipelineOptions) -> "CreateDatasetConfig":
        flags = options.view_as(CreateDatasetOptions)
        if not flags.manifest:
            raise ValueError("--manifest is required")
        if not flags.output_dir:
            raise ValueError("--output_dir is required")
        output_dir = flags.output_dir.rstrip("/")
        temp_root = options.view_as(GoogleCloudOptions).temp_location or output_dir
        return cls(
            manifests=expand_patterns(flags.manifest),
            ratings=expand_patterns(flags.ratings) if flags.ratings else [],
            labels=read_labels_file(flags.labels_file) if flags.labels_file else None,
            output_dir=output_dir,
            temp_dir=layout.join(temp_root, "tft_temp"),
            split_spec=SplitSpec.parse(flags.split, flags.split_names),
            dedupe=flags.dedupe,
            vote_policy=VotePolicy(flags.min_agreement, flags.vote_policy),
            image_spec=ImageSpec(
                image_size=flags.image_size,
                channels=flags.channels,
                resize_method=flags.resize_method,
                image_format=flags.image_format,
                jpeg_quality=flags.jpeg_quality,
                max_pixels=flags.max_pixels,
            ),
            num_shards=flags.num_shards,
            analyze=not flags.skip_analysis,
        )

    def parameters(self) -> dict[str, Any]:
        """The settings recorded in dataset_info.json."""
        return {
            "manifests": self.manifests,
            "ratings": self.ratings,
            "split_names": list(self.split_spec.names),
            "split_fractions": list(self.split_spec.fractions),
            "dedupe": self.dedupe,
            "min_agreement": self.vote_policy.min_agreement,
            "vote_policy": self.vote_policy.on_disagreement,
            **dataclasses.asdict(self.image_spec),
            "num_shards": self.num_shards,
            "package_version": package_version(),
        }


def read_labels_file(path: str) -> list[str]:
    """Labels in file order, one per line; blank lines ignored, duplicates rejected."""
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        labels = [line.strip() for line in handle.read().decode("utf-8").splitlines() if line.strip()]
    if not labels:
        raise ValueError(f"labels file {path} is empty")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels file {path} lists a label more than once")
    return labels


def count_one(_: Any) -> int:
    return 1


def format_labels(labels: list[str]) -> str:
    return "\n".join(labels)


class CreateDataset(beam.PTransform):
    """The whole job as one composite: manifests in, dataset directory out."""

    def __init__(self, config: CreateDatasetConfig):
        super().__init__()
        self._config = config

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection[dict[str, Any]]:
        config = self._config
        rows, manifest_letters = pbegin | "ReadManifests" >> ReadCsvRows(config.manifests, "manifest")
        if config.ratings:
            ratings, rating_letters = pbegin | "ReadRatings" >> ReadCsvRows(config.ratings, "ratings")
        else:
            ratings = pbegin | "NoRatings" >> beam.Create([])
            rating_letters = pbegin | "NoRatingLetters" >> beam.Create([])
        labeled, label_letters = {"rows": rows, "ratings": ratings} | "ResolveLabels" >> ResolveLabels(
            config.vote_policy)
        if config.labels is not None:
            vocabulary = pbegin | "ReadVocabulary" >> beam.Create([config.labels])
        else:
            vocabulary = labeled | "DeriveVocabulary" >> DeriveVocabulary()
        indexed, index_letters = labeled | "AssignLabelIndices" >> AssignLabelIndices(vocabulary)
        loaded, image_letters = indexed | "LoadImages" >> LoadImages(config.image_spec)
        dedupe_letters = pbegin | "NoDedupeLetters" >> beam.Create([])
        if config.dedupe == "content":
            loaded, dedupe_letters = loaded | "DedupeByContent" >> DedupeByContent()
        records, record_letters = loaded | "BuildRecords" >> BuildRecords(config.split_spec, config.dedupe)
        by_split = records | "WriteSplits" >> WriteDatasetSplits(
            config.output_dir, config.split_spec.names, config.num_shards)
        _ = (
            vocabulary
            | "FormatLabels" >> beam.Map(format_labels)
            | "WriteLabels" >> beam.io.WriteToText(
                layout.join(config.output_dir, layout.LABELS_FILE), num_shards=1, shard_name_template="")
        )
        if config.analyze:
            spec = config.image_spec
            _ = by_split[config.split_spec.names[0]] | "AnalyzeTrainSplit" >> AnalyzeAndWriteTransform(
                config.output_dir,
                config.temp_dir,
                make_preprocessing_fn(spec.image_size, spec.channels, spec.resize_method),
            )
        letters = (
            manifest_letters, rating_letters, label_letters, index_letters, image_letters, dedupe_letters,
            record_letters,
        ) | "FlattenDeadLetters" >> beam.Flatten()
        _ = letters | "WriteDeadLetters" >> WriteDeadLetters(config.output_dir)
        read_rows = (
            (rows | "CountRows" >> beam.Map(count_one)),
            (manifest_letters | "CountManifestRejections" >> beam.Map(count_one)),
        ) | "FlattenReadRows" >> beam.Flatten()
        return {
            "records": records, "dead_letters": letters, "read_rows": read_rows, "vocabulary": vocabulary,
        } | "WriteDatasetInfo" >> WriteDatasetInfo(config.output_dir, config.parameters())


def write_schema(output_dir: str) -> None:
    """Writes ``schema.pbtxt`` (tensorflow_metadata) for the dataset record."""
    if not FileSystems.exists(output_dir):
        FileSystems.mkdirs(output_dir)
    with FileSystems.create(layout.join(output_dir, layout.SCHEMA_FILE)) as handle:
        handle.write(dataset.DATASET_RECORD.metadata_schema_pbtxt().encode("utf-8"))


def run(argv: list[str] | None = None) -> beam.runners.runner.PipelineResult:
    """Builds and runs the job; returns the finished pipeline's result."""
    options = make_pipeline_options(list(sys.argv[1:] if argv is None else argv), job_options=CreateDatasetOptions)
    config = CreateDatasetConfig.from_options(options)
    write_schema(config.output_dir)
    pipeline = beam.Pipeline(options=options)
    _ = pipeline | "CreateDataset" >> CreateDataset(config)
    result = pipeline.run()
    result.wait_until_finish()
    if config.analyze and FileSystems.exists(config.temp_dir):
        FileSystems.delete([config.temp_dir])
    return result


def read_dataset_info(output_dir: str) -> dict[str, Any]:
    with FileSystems.open(layout.join(output_dir, layout.DATASET_INFO_FILE)) as handle:
        return json.loads(handle.read().decode("utf-8"))


def format_summary(info: dict[str, Any]) -> str:
    """A few human-readable lines: accounting, per-split counts, rejections."""
    accounting = info["accounting"]
    lines = [
        f"read {accounting['read']}  written {accounting['written']}  rejected {accounting['rejected']}  "
        f"({'balanced' if accounting['balanced'] else 'NOT BALANCED'})",
    ]
    for split, counts in info["counts"].items():
        lines.append(f"  {split:<8} {counts['total']:>7} images, {len(counts['labels'])} labels")
    for reason, count in sorted(info["rejected"].items()):
        lines.append(f"  rejected {reason}: {count}")
    for reason, count in sorted(info["rejected_ratings"].items()):
        lines.append(f"  rejected rating rows {reason}: {count}")
    lines.append(f"  fingerprint {info['fingerprint'][:16]}...")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:  # Flag and configuration errors end here, in one line and exit status 2, before anything runs.
        options = make_pipeline_options(list(sys.argv[1:] if argv is None else argv), job_options=CreateDatasetOptions)
        CreateDatasetConfig.from_options(options)
    except ValueError as error:
        return report_usage_error("create-dataset", error)
    output_dir = options.view_as(CreateDatasetOptions).output_dir
    run(argv)
    print(format_summary(read_dataset_info(output_dir.rstrip("/"))))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(main())
