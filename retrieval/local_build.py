"""Building a whole index in one process, without Beam: the same steps build_index runs on workers.

For benchmarks, tools and tests that hold their vectors in memory. The
Beam job (``beam_jobs.build_index``) reads a warehouse, dead-letters bad rows
and builds the shards in parallel workers; here the rows must already be
valid (``retrieval.index_build.checked_unit_vector``) and unique.
"""

from __future__ import annotations

from typing import Sequence

from retrieval import index_build, index_tuning
from schemas import index as index_schema
from schemas.index import IndexInfo
from schemas.publication import OutputRun


def build_index_in_process(
    output_dir: str,
    rows: Sequence[index_build.IndexRow],
    *,
    model_version: str,
    dimension: int,
    num_shards: int = 1,
    k: int = 10,
    target_recall: float = 0.95,
    source: str = "in-process",
    model_dir: str | None = None,
    overwrite: bool = False,
    query_sample_size: int | None = None,
    sweep_partitions: bool = True,
) -> tuple[str, IndexInfo]:
    """Builds, tunes and publishes an index of ``rows`` under ``output_dir`` (output rule).

    ``sweep_partitions=False`` skips choosing tree shards' partitioning
    (``retrieval.index_build.build_searcher``): for benchmarks of what it buys.

    Returns:
      The published run directory and its ``IndexInfo``.

    Raises:
      OutputExistsError: ``output_dir`` is not empty and ``overwrite`` is False.
      TargetRecallNotMet: Tuning could not reach ``target_recall``; nothing is published.
      ValueError: Duplicate image_ids, num_shards < 1, or fewer than 2 rows.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1. Received `num_shards={num_shards}`")
    run = OutputRun.start(output_dir, overwrite=overwrite)
    try:
        by_shard: list[list[index_build.IndexRow]] = [[] for _ in range(num_shards)]
        for row in rows:
            by_shard[index_schema.shard_for_id(row.image_id, num_shards)].append(row)
        shards = [index_build.build_shard(run.run_dir, shard, num_shards, shard_rows, dimension, k,
                                          target_recall=target_recall, sweep_partitions=sweep_partitions)
                  for shard, shard_rows in enumerate(by_shard)]
        info = index_tuning.finalize_index(run.run_dir, shards, model_version=model_version, dimension=dimension,
                                           k=k, target_recall=target_recall, rejected=0, source=source,
                                           model_dir=model_dir, query_sample_size=query_sample_size)
    except BaseException:
        run.abandon()
        raise
    return run.publish(), info
