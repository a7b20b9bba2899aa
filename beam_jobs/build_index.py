"""build_index: a ScaNN index over one model_version's embeddings, tuned to a recall target.

Input (``--warehouse``): the table extract_embeddings wrote
(``duckdb:PATH[#TABLE]``, ``parquet:DIR[#TABLE]`` or
``bigquery:PROJECT.DATASET.TABLE``), read through its deduplicated view
(newest row per image_id and model_version). ``--model_version`` picks the
version (default: the newest).

Output (``--output_dir``, local or gs://): an index directory
(``schemas.index``): ``--num_shards`` ScaNN shards built in parallel Beam
workers, each with its id map (image_id, uri, label, split) and vectors,
``index_info.json`` (counts, ScaNN parameters, the tuned search settings and
their measured recall@k and QPS) and ``rejected-*.jsonl`` for rows not
indexed (wrong dimension, NaN/zero vector, duplicate image_id). It follows
the output rule: the pipeline itself publishes the run as its last step,
only once complete, balanced and tuned (so a launch that does not wait, such
as a Flex Template's, publishes too); a non-empty ``--output_dir`` needs
``--overwrite``.

Exit status: 0 published; 1 the accounting (read = indexed + rejected) did
not balance or the recall target could not be met (nothing published);
2 a flag error; 3 an empty table, an unknown model_version or a --model_dir
of another model_version (one line on stderr, nothing written).

Example:
  vision-pipelines build-index --warehouse duckdb:out/warehouse.duckdb --output_dir out/index \\
      --model_dir out/model/best --num_shards 2 --k 10 --target_recall 0.95
  vision-pipelines search --index_dir out/index --image_id IMAGE_ID --k 5
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

from retrieval.index_tuning import TargetRecallNotMet
from schemas import counters
from schemas.exit_status import UnusableInputError
from schemas.index import IndexInfo
from schemas.model_artifacts import ModelInfo
from schemas.publication import OutputExistsError, OutputRun, published_dir
from schemas.redaction import redacted_console
from transforms.dead_letters import WriteDeadLetters, counter_total
from transforms.index_building import (
    INDEXED_COUNTER,
    BuildIndex,
    IndexSpec,
    UnbalancedAccountingError,
    check_accounting,
)
from transforms.inference_preconditions import check_model_dir
from transforms.publishing import Launch, PublishWhenWritten, failure_of, finish, launch
from transforms.runner_policy import (
    is_dry_run,
    make_pipeline_options,
    report_dry_run,
    report_usage_error,
    require_flags,
    tolerate_shared_flags,
)
from transforms.warehouse_read import READ_COUNTER, ReadFromWarehouse, WarehouseReadError, describe_embeddings

_LOGGER = logging.getLogger(__name__)

REJECTED_COUNTER = counters.REJECTED
MAX_SHARDS = 1024
MAX_K = 1000


class BuildIndexOptions(PipelineOptions):
    """The job's own flags; every other flag is a standard Beam option."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        tolerate_shared_flags(parser)
        parser.add_argument("--warehouse", default=None,
                            help="bigquery:PROJECT.DATASET.TABLE, duckdb:PATH[#TABLE] or parquet:DIR[#TABLE].")
        parser.add_argument("--output_dir", default=None, help="Index directory (local or gs://).")
        parser.add_argument("--model_version", default=None, help="The model_version to index (default: newest).")
        parser.add_argument("--model_dir", default=None,
                            help="The model the embeddings came from: recorded so search can embed query "
                                 "images; its model_version must match.")
        parser.add_argument("--num_shards", type=int, default=1, help="Index shards, built in parallel.")
        parser.add_argument("--k", type=int, default=10, help="Neighbours recall is measured at.")
        parser.add_argument("--target_recall", type=float, default=0.95,
                            help="recall@k the tuned search must reach on held-out queries, in (0, 1].")
        parser.add_argument("--overwrite", action="store_true",
                            help="Replace a non-empty --output_dir (published only when the new run succeeded).")


@dataclasses.dataclass(frozen=True)
class BuildIndexConfig:
    """Validated job configuration, built once from the options."""

    warehouse_uri: str
    output_dir: str
    model_version: str | None
    model_dir: str | None
    num_shards: int
    k: int
    target_recall: float
    overwrite: bool

    @classmethod
    def from_options(cls, options: PipelineOptions) -> "BuildIndexConfig":
        """Raises ValueError quoting the bad flag value."""
        flags = options.view_as(BuildIndexOptions)
        require_flags(flags, "warehouse", "output_dir")
        if not 1 <= flags.num_shards <= MAX_SHARDS:
            raise ValueError(f"--num_shards must be in [1, {MAX_SHARDS}]. Received `--num_shards={flags.num_shards}`")
        if not 1 <= flags.k <= MAX_K:
            raise ValueError(f"--k must be in [1, {MAX_K}]. Received `--k={flags.k}`")
        if not 0 < flags.target_recall <= 1:
            raise ValueError(f"--target_recall must be in (0, 1]. Received `--target_recall={flags.target_recall}`")
        return cls(
            warehouse_uri=flags.warehouse,
            output_dir=flags.output_dir.rstrip("/"),
            model_version=flags.model_version,
            model_dir=flags.model_dir,
            num_shards=flags.num_shards,
            k=flags.k,
            target_recall=flags.target_recall,
            overwrite=flags.overwrite,
        )


@dataclasses.dataclass(frozen=True)
class BuildIndexResult:
    """What ``run`` did: the pipeline result, the published run and its accounting (a dry run: none)."""

    pipeline_result: PipelineResult
    index_dir: str
    info: IndexInfo | None
    counts: dict[str, int]


def resolve_source(config: BuildIndexConfig) -> tuple[str, int, int, str | None]:
    """The model_version, row count and dimension to index, checked before any pipeline runs.

    Returns:
      ``(model_version, rows, dimension, model_dir)``.

    Raises:
      WarehouseReadError: Empty table, unknown model_version, or fewer than 2 rows.
      UnusableInputError: ``--model_dir`` holds no model, or another model_version than the rows.
    """
    summary = describe_embeddings(config.warehouse_uri, config.model_version)
    if summary.rows < 2:
        raise WarehouseReadError(f"{config.warehouse_uri} has {summary.rows} row(s) of model_version "
                                 f"{summary.model_version}; an index needs at least 2")
    dimension = summary.dimension
    model_dir = None
    if config.model_dir is not None:
        check_model_dir(config.model_dir)
        model_dir = published_dir(config.model_dir)
        model = ModelInfo.read(model_dir)
        if model.model_version != summary.model_version:
            raise UnusableInputError(f"--model_dir {config.model_dir} has model_version {model.model_version}; the rows "
                             f"being indexed are {summary.model_version}")
        dimension = model.embedding_dim
    return summary.model_version, summary.rows, dimension, model_dir


def start(argv: list[str] | None = None) -> Launch:
    """Checks the source, builds the job into a fresh run directory and starts it without waiting.

    The pipeline publishes the run itself, once the shards, ``index_info.json``
    and the dead letters are written, the search is tuned to the target and
    read = indexed + rejected; on any failure it publishes nothing.

    Raises:
      OutputExistsError: ``--output_dir`` is not empty and ``--overwrite`` was not given.
      WarehouseReadError: See ``resolve_source``.
    """
    options = make_pipeline_options(list(argv or []), job_options=BuildIndexOptions)
    config = BuildIndexConfig.from_options(options)
    model_version, rows, dimension, model_dir = resolve_source(config)
    output = OutputRun.start(config.output_dir, overwrite=config.overwrite)
    try:
        spec = IndexSpec(run_dir=output.run_dir, model_version=model_version, dimension=dimension,
                         num_shards=config.num_shards, k=config.k, target_recall=config.target_recall,
                         source=config.warehouse_uri, model_dir=model_dir)
        pipeline = beam.Pipeline(options=options)
        embeddings = pipeline | "ReadEmbeddings" >> ReadFromWarehouse(config.warehouse_uri,
                                                                      model_version=model_version, rows=rows)
        info, dead_letters = embeddings | "BuildIndex" >> BuildIndex(spec)
        written = {
            "index_info": info,
            "dead_letters": dead_letters | "WriteDeadLetters" >> WriteDeadLetters(output.run_dir),
            "read": embeddings | "CountRead" >> beam.combiners.Count.Globally(),
        }
        _ = written | "PublishIndex" >> PublishWhenWritten(output, check=check_accounting)
    except BaseException:
        output.abandon()
        raise
    return launch(pipeline, [output], dry_run=is_dry_run(options), explain=explain_failure)


def explain_failure(error: BaseException) -> None:
    """Raises the job's own exception when the recall target or the accounting check failed the pipeline."""
    for kind in (TargetRecallNotMet, UnbalancedAccountingError):
        message = failure_of(error, kind)
        if message is not None:
            raise kind(message) from error


def run(argv: list[str] | None = None) -> BuildIndexResult:
    """Builds, tunes and publishes the index and waits for it; publishes nothing on any failure.

    Raises:
      OutputExistsError: ``--output_dir`` is not empty and ``--overwrite`` was not given.
      WarehouseReadError: See ``resolve_source``.
      TargetRecallNotMet: The tuned search cannot reach ``--target_recall``.
      UnbalancedAccountingError: read != indexed + rejected.
    """
    started = start(argv)
    result = finish(started)
    if started.dry_run:  # The Dataflow job was only built: nothing ran, nothing was published.
        return BuildIndexResult(result, "", None, {})
    (output,) = started.runs
    counts = {name: counter_total(result, name) for name in (READ_COUNTER, INDEXED_COUNTER, REJECTED_COUNTER)}
    return BuildIndexResult(result, output.run_dir, IndexInfo.read(output.run_dir), counts)


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    # Flag and configuration errors end here in one line and exit status 2; an empty table, an unknown
    # model_version or a model of another version (UnusableInputError) in exit status 3.
    try:
        options = make_pipeline_options(argv, job_options=BuildIndexOptions)
        BuildIndexConfig.from_options(options)
        done = run(argv)
    except (OutputExistsError, WarehouseReadError) as error:
        return report_usage_error("build-index", error)
    except (TargetRecallNotMet, UnbalancedAccountingError) as error:
        sys.stderr.write(f"vision-pipelines build-index: error: {error}\n")
        return 1
    except ValueError as error:
        return report_usage_error("build-index", error)
    if is_dry_run(options):
        return report_dry_run("build-index", options)
    info = done.info
    print(json.dumps({**done.counts, "index_dir": done.index_dir, "model_version": info.model_version,
                      "num_shards": info.num_shards, f"recall_at_{info.k}": info.recall_at_k, "qps": info.qps,
                      "query_sample_size": info.query_sample_size, "search": info.search.to_dict()},
                     sort_keys=True))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    with redacted_console():
        sys.exit(main(sys.argv[1:]))
