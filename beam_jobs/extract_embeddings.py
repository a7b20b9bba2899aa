"""extract_embeddings: the exported model's embedding of every image, into a SQL warehouse.

Inputs (``--input``): the same as batch_predict: a manifest CSV of
``uri[,label]`` rows, a glob of image files (local or gs://), or
create_dataset TFRecords (a dataset directory or a shard glob; these carry
label and split). ``--model_dir`` is a model directory written by train.

Output (``--warehouse``): one ``schemas.embedding.EMBEDDING_RECORD`` row per
image (image_id, uri, label, split, the model's L2-normalized ``embedding``,
model_version, created_at) in

- ``duckdb:PATH[#TABLE]`` (default ``duckdb:warehouse.duckdb``): a DuckDB file;
- ``parquet:DIR[#TABLE]``: Parquet files under ``DIR/TABLE/``;
- ``bigquery:PROJECT.DATASET.TABLE``: FILE_LOADS, needs ``--temp_location gs://...``;
  the table is created day-partitioned on created_at and clustered by
  model_version, label.

plus ``rejected-*.jsonl`` dead letters in a run directory of their own:
published under ``--artifacts_dir`` (``schemas.publication``; a non-empty one
needs ``--overwrite``) or, by default, under ``PATH.runs/`` beside a DuckDB
file or ``DIR/_runs/`` in a Parquet root, so concurrent jobs never overwrite
each other's. The job prints ``read``,
``embedded`` and ``rejected`` counts; read = embedded + rejected. Query the
table with ``vision-pipelines sql``.

Example:
  vision-pipelines extract-embeddings --model_dir out/model/best \\
      --input out/dataset --warehouse duckdb:out/warehouse.duckdb
  vision-pipelines sql --warehouse duckdb:out/warehouse.duckdb --query neighbors --image_id ID --k 5
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult

from schemas import counters
from schemas import embedding as embedding_schema
from schemas.exit_status import UNUSABLE_INPUT_EXIT, UnusableInputError
from schemas.publication import OutputExistsError, OutputRun
from schemas.redaction import redacted_console
from schemas.warehouse import WRITE_DISPOSITIONS, parse_warehouse_uri, run_artifacts_root
from transforms.dead_letters import WriteDeadLetters, counter_total
from transforms.embedding_rows import EMBEDDED_COUNTER, ExtractEmbeddings
from transforms.inference_inputs import READ_COUNTER, ReadImageInputs
from transforms.inference_options import InferenceConfig, InferenceOptions
from transforms.inference_preconditions import check_input_matches, check_model_dir, no_inputs_message
from transforms.publishing import Launch, PublishWhenWritten, finish, launch
from transforms.runner_policy import (
    is_dry_run,
    make_pipeline_options,
    report_dry_run,
    report_usage_error,
    tolerate_shared_flags,
)
from transforms.warehouse import WriteEmbeddings

_LOGGER = logging.getLogger(__name__)

DEFAULT_WAREHOUSE = "duckdb:warehouse.duckdb"
REJECTED_COUNTER = counters.REJECTED


class ExtractEmbeddingsOptions(InferenceOptions):
    """The job's own flags; every other flag is a standard Beam option."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        tolerate_shared_flags(parser)
        parser.add_argument("--warehouse", default=DEFAULT_WAREHOUSE,
                            help="bigquery:PROJECT.DATASET.TABLE, duckdb:PATH[#TABLE] or parquet:DIR[#TABLE].")
        parser.add_argument("--write_disposition", choices=WRITE_DISPOSITIONS, default="append",
                            help="Append rows to the table or replace its contents.")
        parser.add_argument("--artifacts_dir", default=None,
                            help="Where rejected-*.jsonl goes, published under the output rule (default: a run "
                                 "directory of its own under PATH.runs/ beside a DuckDB file or DIR/_runs/).")
        parser.add_argument("--overwrite", action="store_true",
                            help="Replace a non-empty --artifacts_dir (published only when the new run succeeded).")


@dataclasses.dataclass(frozen=True)
class ExtractEmbeddingsConfig:
    """Validated job configuration, built once from the options.

    Attributes:
      artifacts_dir: ``--artifacts_dir`` as given, or None for a run
        directory under ``artifacts_root`` beside the warehouse.
    """

    inference: InferenceConfig
    warehouse_uri: str
    artifacts_dir: str | None
    artifacts_root: str | None
    write_disposition: str
    overwrite: bool

    @classmethod
    def from_options(cls, options: PipelineOptions) -> "ExtractEmbeddingsConfig":
        flags = options.view_as(ExtractEmbeddingsOptions)
        warehouse = parse_warehouse_uri(flags.warehouse, embedding_schema.EMBEDDINGS_TABLE.default_table)
        artifacts_root = run_artifacts_root(warehouse)
        if flags.artifacts_dir is None and artifacts_root is None:
            raise ValueError(f"--artifacts_dir is required with --warehouse {flags.warehouse} (for rejected-*.jsonl)")
        return cls(
            inference=InferenceConfig.from_options(options),
            warehouse_uri=flags.warehouse,
            artifacts_dir=flags.artifacts_dir.rstrip("/") if flags.artifacts_dir else None,
            artifacts_root=artifacts_root,
            write_disposition=flags.write_disposition,
            overwrite=flags.overwrite,
        )

    def start_artifacts_run(self) -> OutputRun:
        """This run's artifacts directory: under ``--artifacts_dir`` (output rule) or its own beside the warehouse.

        Raises:
          OutputExistsError: ``--artifacts_dir`` is not empty and ``--overwrite`` was not given.
        """
        if self.artifacts_dir is not None:
            return OutputRun.start(self.artifacts_dir, overwrite=self.overwrite, flag="--artifacts_dir")
        return OutputRun.start(str(self.artifacts_root), overwrite=True)


def start(argv: list[str] | None = None) -> Launch:
    """Builds the job and starts it without waiting; the pipeline publishes the artifacts run itself.

    The artifacts run (the dead letters) is published only once the
    embeddings are in the warehouse too, so a published run means the whole
    job succeeded.

    Raises:
      OutputExistsError: ``--artifacts_dir`` is not empty and ``--overwrite`` was not given.
    """
    options = make_pipeline_options(list(argv or []), job_options=ExtractEmbeddingsOptions)
    config = ExtractEmbeddingsConfig.from_options(options)
    handler = config.inference.make_handler()
    artifacts = config.start_artifacts_run()
    try:
        pipeline = beam.Pipeline(options=options)
        images, read_letters = pipeline | "ReadInputs" >> ReadImageInputs(config.inference.input_spec)
        rows, embed_letters = images | "ExtractEmbeddings" >> ExtractEmbeddings(handler)
        written = {
            "embeddings": rows | "WriteEmbeddings" >> WriteEmbeddings(config.warehouse_uri,
                                                                      write_disposition=config.write_disposition),
            "dead_letters": (
                (read_letters, embed_letters)
                | "MergeDeadLetters" >> beam.Flatten()
                | "WriteDeadLetters" >> WriteDeadLetters(artifacts.run_dir)
            ),
        }
        _ = written | "PublishArtifacts" >> PublishWhenWritten(artifacts)
    except BaseException:
        artifacts.abandon()
        raise
    return launch(pipeline, [artifacts], dry_run=is_dry_run(options))


def run(argv: list[str] | None = None) -> PipelineResult:
    """Runs the job and waits; the pipeline has published the artifacts run when this returns."""
    return finish(start(argv))


def accounting(result: PipelineResult) -> dict[str, int]:
    """``read``, ``embedded`` and ``rejected`` from the run's metrics."""
    return {name: counter_total(result, name) for name in (READ_COUNTER, EMBEDDED_COUNTER, REJECTED_COUNTER)}


def main(argv: list[str] | None = None) -> int:
    try:  # Flag and configuration errors end here, in one line and exit status 2, before anything runs.
        options = make_pipeline_options(list(argv or []), job_options=ExtractEmbeddingsOptions)
        config = ExtractEmbeddingsConfig.from_options(options)
        flags = options.view_as(ExtractEmbeddingsOptions)
    except ValueError as error:
        return report_usage_error("extract-embeddings", error)
    try:  # What the flags name must exist: one line and exit status 3 otherwise, before anything runs.
        check_model_dir(flags.model_dir)
        check_input_matches(config.inference.input_spec.pattern)
    except UnusableInputError as error:
        return report_usage_error("extract-embeddings", error)
    try:
        result = run(argv)
    except OutputExistsError as error:  # Checked when the run starts, before the pipeline is built.
        return report_usage_error("extract-embeddings", error)
    if is_dry_run(options):
        return report_dry_run("extract-embeddings", options)
    counts = accounting(result)
    print(json.dumps(counts, sort_keys=True))
    if counts[READ_COUNTER] == 0:  # An input with no rows: say so, in a status scripts can test.
        sys.stderr.write(f"vision-pipelines extract-embeddings: error: {no_inputs_message(flags.input)}\n")
        return UNUSABLE_INPUT_EXIT
    if counts[READ_COUNTER] != counts[EMBEDDED_COUNTER] + counts[REJECTED_COUNTER]:
        _LOGGER.error("Accounting mismatch: read %d != embedded %d + rejected %d",
                      counts[READ_COUNTER], counts[EMBEDDED_COUNTER], counts[REJECTED_COUNTER])
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    with redacted_console():
        sys.exit(main(sys.argv[1:]))
