"""near_duplicates: every pair of indexed images at or above a cosine similarity, found through the ScaNN index.

The route for tables too large for the SQL ``near_duplicates`` query (which
refuses them, naming this command): each indexed vector's ``--k`` nearest
neighbours are searched in parallel Beam workers with the index's tuned
settings (``transforms.near_duplicates``), kept at or above ``--threshold``,
deduplicated (each unordered pair once, ``image_id_a < image_id_b``) and
written with the index's model_version to the warehouse table
``schemas.near_duplicates`` declares, so SQL can join a pair back to its
embeddings.

Input (``--index_dir``): an index build-index published (local or gs://).
Output (``--warehouse``): ``duckdb:PATH[#TABLE]``, ``parquet:DIR[#TABLE]`` or
``bigquery:PROJECT.DATASET.TABLE``; the default table name is
``near_duplicates``. ``--write_disposition append`` (default) adds a run's
pairs, ``truncate`` replaces the table.

Recall: a pair is found when one image is among the other's k nearest in
the index (approximate search tuned to recall@k >= the index's target; near
duplicates, being the nearest, are the easiest to find). An image with more
than k near-duplicates keeps its k closest; the job counts such images and
says to raise ``--k``.

Exit status: 0 written; 1 not every indexed vector was searched; 2 a flag
error; 3 no published index at ``--index_dir`` (one line on stderr).

Example:
  vision-pipelines build-index --warehouse duckdb:out/warehouse.duckdb --output_dir out/index
  vision-pipelines near-duplicates --index_dir out/index --threshold 0.95 \\
      --warehouse duckdb:out/warehouse.duckdb
  vision-pipelines sql --warehouse duckdb:out/warehouse.duckdb \\
      --sql "SELECT * FROM near_duplicates ORDER BY similarity DESC LIMIT 20"
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import sys
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult

from schemas.exit_status import UnusableInputError
from schemas.index import IndexInfo
from schemas.near_duplicates import NEAR_DUPLICATES_TABLE
from schemas.publication import published_dir
from schemas.redaction import redacted_console
from schemas.warehouse import WRITE_DISPOSITIONS, WriteDisposition, parse_warehouse_uri
from transforms.dead_letters import counter_total
from transforms.near_duplicates import (
    PAIRS_COUNTER,
    SATURATED_COUNTER,
    SEARCHED_COUNTER,
    FindNearDuplicates,
    NearDuplicateSpec,
)
from transforms.runner_policy import (
    is_dry_run,
    make_pipeline_options,
    report_dry_run,
    report_usage_error,
    require_flags,
    tolerate_shared_flags,
)
from transforms.warehouse import WriteToWarehouse

_LOGGER = logging.getLogger(__name__)

MAX_K = 1_000
MAX_BATCH_SIZE = 100_000


class NearDuplicatesOptions(PipelineOptions):
    """The job's own flags; every other flag is a standard Beam option."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        tolerate_shared_flags(parser)
        parser.add_argument("--index_dir", default=None, help="An index directory build-index published.")
        parser.add_argument("--warehouse", default=None,
                            help="Where the pairs go: bigquery:PROJECT.DATASET.TABLE, duckdb:PATH[#TABLE] or "
                                 "parquet:DIR[#TABLE] (default table: near_duplicates).")
        parser.add_argument("--threshold", type=float, default=0.95, help="Minimum cosine similarity of a pair.")
        parser.add_argument("--k", type=int, default=10, help="Neighbours searched per indexed image.")
        parser.add_argument("--batch_size", type=int, default=1_000, help="Images searched per batch.")
        parser.add_argument("--write_disposition", default="append", choices=WRITE_DISPOSITIONS,
                            help="append (default) adds this run's pairs; truncate replaces the table.")


@dataclasses.dataclass(frozen=True)
class NearDuplicatesConfig:
    """Validated job configuration, built once from the options."""

    index_dir: str
    warehouse_uri: str
    threshold: float
    k: int
    batch_size: int
    write_disposition: WriteDisposition

    @classmethod
    def from_options(cls, options: PipelineOptions) -> "NearDuplicatesConfig":
        """Raises ValueError quoting the bad flag value."""
        flags = options.view_as(NearDuplicatesOptions)
        require_flags(flags, "index_dir", "warehouse")
        if not -1 < flags.threshold <= 1:  # Also refuses NaN.
            raise ValueError(f"--threshold must be a cosine similarity in (-1, 1]. "
                             f"Received `--threshold={flags.threshold}`")
        if not 1 <= flags.k <= MAX_K:
            raise ValueError(f"--k must be in [1, {MAX_K}]. Received `--k={flags.k}`")
        if not 1 <= flags.batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"--batch_size must be in [1, {MAX_BATCH_SIZE}]. Received `--batch_size={flags.batch_size}`")
        parse_warehouse_uri(flags.warehouse, NEAR_DUPLICATES_TABLE.default_table)  # Raises ValueError.
        return cls(flags.index_dir.rstrip("/"), flags.warehouse, flags.threshold, flags.k, flags.batch_size,
                   flags.write_disposition)


class IncompleteSearchError(RuntimeError):
    """Not every indexed vector was searched exactly once."""


@dataclasses.dataclass(frozen=True)
class NearDuplicatesResult:
    """What ``run`` did: the pipeline result, the index it searched and its counts."""

    pipeline_result: PipelineResult
    index_dir: str
    info: IndexInfo
    counts: dict[str, int]


def load_index_info(index_dir: str) -> tuple[str, IndexInfo]:
    """The published run directory and ``index_info.json`` of ``--index_dir``.

    Raises:
      UnusableInputError: No published index there (also when the run's index_info.json is missing).
    """
    try:
        run_dir = published_dir(index_dir)
        return run_dir, IndexInfo.read(run_dir)
    except (FileNotFoundError, OSError) as error:
        raise UnusableInputError(f"--index_dir {index_dir} holds no published index: {error}") from error


def run(argv: list[str] | None = None) -> NearDuplicatesResult:
    """Searches every indexed vector and writes the pairs.

    Raises:
      ValueError: A flag error.
      UnusableInputError: No published index (see ``load_index_info``).
      IncompleteSearchError: searched != indexed (the pairs were written; the count says what is missing).
    """
    options = make_pipeline_options(list(argv or []), job_options=NearDuplicatesOptions)
    config = NearDuplicatesConfig.from_options(options)
    run_dir, info = load_index_info(config.index_dir)
    spec = NearDuplicateSpec(run_dir=run_dir, count=info.count, model_version=info.model_version, k=config.k,
                             threshold=config.threshold, batch_size=config.batch_size,
                             created_at=datetime.datetime.now(datetime.timezone.utc))
    pipeline = beam.Pipeline(options=options)
    _ = (pipeline
         | "FindNearDuplicates" >> FindNearDuplicates(spec)
         | "WritePairs" >> WriteToWarehouse(config.warehouse_uri, NEAR_DUPLICATES_TABLE,
                                            write_disposition=config.write_disposition))
    result = pipeline.run()
    result.wait_until_finish()
    if is_dry_run(options):  # The Dataflow job was only built: nothing was searched or written.
        return NearDuplicatesResult(result, run_dir, info, {})
    counts = {name: counter_total(result, name) for name in (SEARCHED_COUNTER, SATURATED_COUNTER, PAIRS_COUNTER)}
    counts["indexed"] = info.count
    if counts[SEARCHED_COUNTER] != info.count:
        raise IncompleteSearchError(f"searched {counts[SEARCHED_COUNTER]} of the {info.count} indexed vectors")
    if counts[SATURATED_COUNTER]:
        _LOGGER.warning("%d images had all %d neighbours searched at or above %s: they may have more near-duplicates "
                        "than were searched; rerun with a larger --k", counts[SATURATED_COUNTER], config.k,
                        config.threshold)
    return NearDuplicatesResult(result, run_dir, info, counts)


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    try:  # Flag errors (2) and a missing index (3) end here, in one line.
        options = make_pipeline_options(argv, job_options=NearDuplicatesOptions)
        NearDuplicatesConfig.from_options(options)
        done = run(argv)
    except IncompleteSearchError as error:
        sys.stderr.write(f"vision-pipelines near-duplicates: error: {error}\n")
        return 1
    except ValueError as error:
        return report_usage_error("near-duplicates", error)
    if is_dry_run(options):
        return report_dry_run("near-duplicates", options)
    print(json.dumps({**done.counts, "index_dir": done.index_dir, "model_version": done.info.model_version},
                     sort_keys=True))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    with redacted_console():
        sys.exit(main(sys.argv[1:]))
