"""create_dataset: labeled images -> validated, resized, split, sharded TFRecords.

Inputs: ``--manifest`` CSVs/globs of ``uri,label`` (local or gs://), optional
``--ratings`` CSVs of ``uri,rater,label`` and ``--labels_file``.

Outputs in a fresh run directory under ``--output_dir``, which ``CURRENT``
names once the run has succeeded (``schemas.publication``; readers resolve it
with ``published_dir``; the pipeline publishes it as its last step, so a
launch that does not wait, such as a Flex Template's, publishes too): ``{split}-SSSSS-of-NNNNN.tfrecord.gz``,
``labels.txt``, ``schema.pbtxt``, ``transform_fn/`` and
``transformed_metadata/`` (tf.Transform over the train split),
``dataset_info.json`` and ``rejected-*.jsonl``. A non-empty ``--output_dir``
is refused unless ``--overwrite`` is given.

Example:
  vision-pipelines create-dataset --manifest gs://bucket/all_data.csv \\
      --output_dir gs://bucket/dataset --image_size 224 \\
      --runner DataflowRunner --project P --region R --temp_location gs://bucket/tmp
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import logging
import sys
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

from schemas import dataset, layout
from schemas.dataset_info import DatasetInfo, DatasetWarning
from schemas.publication import OutputExistsError, OutputRun, published_dir
from schemas.redaction import redacted_console
from transforms.dataset_records import BuildRecords, DedupeByContent, LoadImages
from transforms.dataset_summary import DatasetWarningsError, WriteDatasetInfo, refuse_warnings
from transforms.dataset_writing import WriteDatasetSplits
from transforms.dead_letters import WriteDeadLetters
from transforms.images import ImageSpec
from transforms.labeling import AssignLabelIndices, DeriveVocabulary, ResolveLabels, VotePolicy
from transforms.manifests import ReadCsvRows, expand_patterns
from transforms.publishing import Launch, PublishWhenWritten, failure_of, finish, launch
from transforms.runner_policy import (
    is_dry_run,
    make_pipeline_options,
    report_dry_run,
    report_usage_error,
    require_flags,
    tolerate_shared_flags,
)
from transforms.splitting import SplitSpec

TFT_TEMP_DIR = "tft_temp"


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
        parser.add_argument("--strict", action="store_true",
                            help="Fail, publishing nothing, when the dataset has warnings (an empty split, a label "
                                 "missing from train, a label with too few images, a dataset too small for its split).")
        parser.add_argument("--overwrite", action="store_true",
                            help="Replace a non-empty --output_dir; the current dataset stays readable until "
                                 "the new one is complete.")


@dataclasses.dataclass(frozen=True)
class CreateDatasetConfig:
    """Validated job configuration, built once from the options."""

    manifests: list[str]
    ratings: list[str]
    labels: list[str] | None
    output_dir: str
    temp_root: str | None
    split_spec: SplitSpec
    dedupe: str
    vote_policy: VotePolicy
    image_spec: ImageSpec
    num_shards: int
    analyze: bool
    overwrite: bool
    strict: bool = False

    @classmethod
    def from_options(cls, options: PipelineOptions) -> "CreateDatasetConfig":
        flags = options.view_as(CreateDatasetOptions)
        require_flags(flags, "manifest", "output_dir")
        if not 0.0 < flags.min_agreement <= 1.0:
            raise ValueError(f"--min_agreement is a fraction in (0, 1]. Received `min_agreement={flags.min_agreement}`")
        if flags.num_shards < 0:
            raise ValueError(f"--num_shards must be >= 0 (0 = automatic). Received `num_shards={flags.num_shards}`")
        temp_location = options.view_as(GoogleCloudOptions).temp_location
        if is_dry_run(options):  # tf.Transform creates its scratch dir while the graph is built: keep it in the run.
            temp_location = None
        return cls(
            manifests=expand_patterns(flags.manifest),
            ratings=expand_patterns(flags.ratings) if flags.ratings else [],
            labels=read_labels_file(flags.labels_file) if flags.labels_file else None,
            output_dir=flags.output_dir.rstrip("/"),
            temp_root=temp_location.rstrip("/") if temp_location else None,
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
            overwrite=flags.overwrite,
            strict=flags.strict,
        )

    def tft_temp_dir(self, run: OutputRun) -> str:
        """tf.Transform's scratch space, private to one run so concurrent jobs never delete each other's."""
        if self.temp_root is None:
            return layout.join(run.run_dir, TFT_TEMP_DIR)
        return layout.join(self.temp_root, TFT_TEMP_DIR, f"{run.output_dir.rsplit('/', 1)[-1]}-{run.run_name}")

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
    """The whole job as one composite: manifests in, one dataset run directory out.

    Returns what each sink wrote, every PCollection complete only once its
    files are (``PublishWhenWritten``'s input): ``dataset_info`` (the written
    ``DatasetInfo``), ``splits``, ``labels``, ``dead_letters`` (file names)
    and, with analysis, ``transform_fn``.

    Args:
      config: The job's configuration.
      output_dir: Where this run writes (a fresh run directory, which ``start``
        has the pipeline publish once everything is written).
      temp_dir: tf.Transform's scratch directory for this run.
    """

    def __init__(self, config: CreateDatasetConfig, output_dir: str, temp_dir: str):
        super().__init__()
        self._config = config
        self._output_dir = output_dir
        self._temp_dir = temp_dir

    def expand(self, pbegin: beam.pvalue.PBegin) -> dict[str, beam.PCollection]:
        config = self._config
        output_dir = self._output_dir
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
        by_split, written_shards = records | "WriteSplits" >> WriteDatasetSplits(
            output_dir, config.split_spec.names, config.num_shards)
        written = {"splits": written_shards}
        written["labels"] = (
            vocabulary
            | "FormatLabels" >> beam.Map(format_labels)
            | "WriteLabels" >> beam.io.WriteToText(
                layout.join(output_dir, layout.LABELS_FILE), num_shards=1, shard_name_template="")
        )
        if config.analyze:
            # Imported here, not at the top: TensorFlow and tf.Transform cost ~6-10 s of import (and TF's
            # own __init__ imports Keras); --help, flag errors and --skip_analysis runs never need them.
            from model_lib.preprocessing import make_preprocessing_fn
            from transforms.tft_analysis import AnalyzeAndWriteTransform

            spec = config.image_spec
            written["transform_fn"] = by_split[config.split_spec.names[0]] | "AnalyzeTrainSplit" >> (
                AnalyzeAndWriteTransform(
                output_dir,
                self._temp_dir,
                make_preprocessing_fn(spec.image_size, spec.channels, spec.resize_method),
            ))
        letters = (
            manifest_letters, rating_letters, label_letters, index_letters, image_letters, dedupe_letters,
            record_letters,
        ) | "FlattenDeadLetters" >> beam.Flatten()
        written["dead_letters"] = letters | "WriteDeadLetters" >> WriteDeadLetters(output_dir)
        read_rows = (
            (rows | "CountRows" >> beam.Map(count_one)),
            (manifest_letters | "CountManifestRejections" >> beam.Map(count_one)),
        ) | "FlattenReadRows" >> beam.Flatten()
        written["dataset_info"] = {
            "records": records, "dead_letters": letters, "read_rows": read_rows, "vocabulary": vocabulary,
        } | "WriteDatasetInfo" >> WriteDatasetInfo(output_dir, config.parameters())
        return written


def write_schema(output_dir: str) -> None:
    """Writes ``schema.pbtxt`` (tensorflow_metadata) for the dataset record."""
    if not FileSystems.exists(output_dir):
        FileSystems.mkdirs(output_dir)
    with FileSystems.create(layout.join(output_dir, layout.SCHEMA_FILE)) as handle:
        handle.write(dataset.DATASET_RECORD.metadata_schema_pbtxt().encode("utf-8"))


def start(argv: list[str] | None = None) -> Launch:
    """Builds the job into a fresh run directory and starts it, without waiting (as a Flex Template launch does).

    The pipeline publishes the run itself once every file is written (with
    ``--strict`` only when the dataset has no warnings) and removes
    tf.Transform's scratch space first.

    Raises:
      OutputExistsError: ``--output_dir`` is not empty and ``--overwrite`` was not given.
    """
    options = make_pipeline_options(list(sys.argv[1:] if argv is None else argv), job_options=CreateDatasetOptions)
    config = CreateDatasetConfig.from_options(options)
    output = OutputRun.start(config.output_dir, overwrite=config.overwrite)
    temp_dir = config.tft_temp_dir(output)
    dry_run = is_dry_run(options)
    try:
        write_schema(output.run_dir)
        pipeline = beam.Pipeline(options=options)
        written = pipeline | "CreateDataset" >> CreateDataset(config, output.run_dir, temp_dir)
        _ = written | "PublishDataset" >> PublishWhenWritten(
            output, check=refuse_warnings if config.strict else None, scratch=[temp_dir])
    except BaseException:
        output.abandon()
        raise
    # A dry run never created the scratch space (and must not look for it on gs://).
    return launch(pipeline, [output], dry_run=dry_run, scratch=() if dry_run else (temp_dir,),
                  explain=functools.partial(explain_failure, output.run_dir))


def explain_failure(run_dir: str, error: BaseException) -> None:
    """Raises ``DatasetWarningsError`` (with the warnings) when the pipeline's ``--strict`` check failed it.

    Called before the failed run is removed, so its ``dataset_info.json`` is still there.
    """
    if failure_of(error, DatasetWarningsError) is not None:
        raise DatasetWarningsError.of(DatasetInfo.read(run_dir).warnings) from error


def run(argv: list[str] | None = None) -> beam.runners.runner.PipelineResult:
    """Runs the job and waits; the pipeline has published the run when this returns.

    Raises:
      OutputExistsError: ``--output_dir`` is not empty and ``--overwrite`` was not given.
      DatasetWarningsError: ``--strict`` and the dataset has warnings (the run is removed, the
        previously published dataset stays current).
    """
    return finish(start(argv))


def read_dataset_info(output_dir: str) -> DatasetInfo:
    """The ``DatasetInfo`` of a dataset directory (a run directory, or one resolved by ``published_dir``)."""
    return DatasetInfo.read(output_dir)


def format_summary(info: DatasetInfo) -> str:
    """A few human-readable lines: accounting, per-split counts, rejections."""
    accounting = info.accounting
    lines = [
        f"read {accounting.read}  written {accounting.written}  rejected {accounting.rejected}  "
        f"({'balanced' if accounting.balanced else 'NOT BALANCED'})",
    ]
    for split in info.split_names:
        counts = info.counts[split]
        lines.append(f"  {split:<8} {counts.total:>7} images, {len(counts.labels)} labels")
    for reason, count in sorted(info.rejected.items()):
        lines.append(f"  rejected {reason}: {count}")
    for reason, count in sorted(info.rejected_ratings.items()):
        lines.append(f"  rejected rating rows {reason}: {count}")
    lines.append(f"  fingerprint {info.fingerprint[:16]}...")
    lines.extend(format_warning(warning) for warning in info.warnings)
    return "\n".join(lines)


def format_warning(warning: DatasetWarning) -> str:
    return f"warning [{warning.code}]: {warning.message}"


def report_summary(info: DatasetInfo) -> int:
    """Prints the summary; returns main's exit code: 1 when the accounting does not balance.

    An unbalanced accounting means rows were lost or counted twice, so the
    job must not look successful to a scheduler even though its files exist.
    """
    print(format_summary(info))
    problem = info.accounting.mismatch()
    if problem:
        print(f"create_dataset: accounting does not balance: {problem}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    try:  # Flag and configuration errors end here, in one line and exit status 2, before anything runs.
        options = make_pipeline_options(list(sys.argv[1:] if argv is None else argv), job_options=CreateDatasetOptions)
        CreateDatasetConfig.from_options(options)
    except ValueError as error:
        return report_usage_error("create-dataset", error)
    output_dir = options.view_as(CreateDatasetOptions).output_dir
    try:
        run(argv)
    except OutputExistsError as error:  # Checked when the run starts, before the pipeline is built.
        return report_usage_error("create-dataset", error)
    except DatasetWarningsError as error:
        for warning in error.warnings:
            print(format_warning(warning), file=sys.stderr)
        print(f"vision-pipelines create-dataset: error: {error}", file=sys.stderr)
        return 1
    if is_dry_run(options):
        return report_dry_run("create-dataset", options)
    return report_summary(read_dataset_info(published_dir(output_dir)))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    with redacted_console():
        raise SystemExit(main())
