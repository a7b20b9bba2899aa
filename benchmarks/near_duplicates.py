"""Benchmark: near-duplicate detection at scale, by the SQL query (DuckDB) and through the ScaNN index.

A DuckDB warehouse of ``--rows`` synthetic clustered 128-d unit vectors
(``benchmarks.vectors``; clusters of 1,000 at cosine ~0.5, the data on which
the old fixed LSH settings went quadratic) plus 50 planted copies at cosine
similarities spread over [0.951, 0.999]. Measured:

- ``sql --query near_duplicates --threshold 0.95`` through ``retrieval.sql_queries`` (settings chosen by
  the query; wall time, this process's CPU time, the chosen settings, planted pairs found), and what the
  query estimates for the old fixed settings (bands 8, band_bits 6), which it now refuses;
- with ``--index``: ``build-index``'s library builds and tunes a ScaNN index of the same rows, then the
  ``near-duplicates`` Beam job (in-process FnApiRunner) finds the pairs.

Run:
  python -m benchmarks.near_duplicates --rows 100000 --index
It writes the ``near_duplicates_<rows>`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import duckdb
import numpy as np

from benchmarks.machine import cpu_description
from benchmarks.report import write_section
from benchmarks.vectors import clustered_unit_vectors, embedding_table, plant_duplicates

VERSION = "synthetic-v1"
THRESHOLD = 0.95


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--index", action="store_true", help="Also build a ScaNN index and run near-duplicates.")
    parser.add_argument("--work_dir", default=None)
    parser.add_argument("--loaded", default="", help="A sentence on the machine's load, for the doc.")
    parser.add_argument("--no_doc", action="store_true")
    args = parser.parse_args(argv)

    from retrieval import sql_queries as sq

    work = args.work_dir or tempfile.mkdtemp(prefix="bench_near_duplicates_")
    os.makedirs(work, exist_ok=True)
    vectors = clustered_unit_vectors(args.rows, 128, seed=11)
    originals = np.arange(0, args.rows, args.rows // 50)[:50]
    copies = plant_duplicates(vectors, originals, np.linspace(0.951, 0.999, len(originals)))
    ids = [f"img-{i:07d}" for i in range(args.rows)] + [f"dup-{i:07d}" for i in originals]
    planted = {(f"dup-{i:07d}", f"img-{i:07d}") for i in originals}
    path = os.path.join(work, "warehouse.duckdb")
    if os.path.exists(path):
        os.remove(path)
    synthetic = embedding_table(np.vstack([vectors, copies]), ids, VERSION)  # noqa: F841 (DuckDB reads it by name)
    connection = duckdb.connect(path)
    connection.execute("CREATE TABLE embeddings AS SELECT * FROM synthetic")
    connection.close()
    warehouse = f"duckdb:{path}"
    lines = [f"## near_duplicates: {len(ids):,} synthetic clustered 128-d unit vectors, 50 planted pairs", "",
             f"`python -m benchmarks.near_duplicates --rows {args.rows}{' --index' if args.index else ''}`", "",
             f"CPU: {cpu_description()}. {args.loaded}", "", "| route | settings | wall s | CPU s | pairs found | "
             "planted found |", "|---|---|---:|---:|---:|---:|"]

    engine = sq.open_engine(warehouse)
    try:
        wall, cpu = time.perf_counter(), _cpu_seconds()
        try:
            result = sq.run_named_query(engine, "near_duplicates", {"threshold": THRESHOLD, "limit": 1_000_000})
        except sq.QueryError as error:  # Too large for the query: the row says so, the index route follows.
            wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
            lines.append(f"| `sql --query near_duplicates --threshold 0.95` (DuckDB) | chosen | {wall:.1f} | "
                         f"{cpu:.1f} | | refused: {error} |")
        else:
            wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
            found = {(r["image_id_a"], r["image_id_b"]) for r in result.records()}
            print(result.note, f"{wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
            lines.append(f"| `sql --query near_duplicates --threshold 0.95` (DuckDB) | {result.note} | {wall:.1f} | "
                         f"{cpu:.1f} | {len(found)} | {len(planted & found)} / {len(planted)} |")
        try:
            sq.run_named_query(engine, "near_duplicates", {"threshold": THRESHOLD, "bands": 8, "band_bits": 6})
            old = "ran"
        except sq.QueryError as error:
            old = f"refused: {error}"
        lines.append(f"| the old fixed settings | bands 8, band_bits 6 | | | | {old} |")
    finally:
        engine.close()

    if args.index:
        from beam_jobs import near_duplicates as job
        from retrieval.index_build import IndexRow
        from retrieval.local_build import build_index_in_process

        everything = np.vstack([vectors, copies])
        rows = [IndexRow(image_id, "", None, None, everything[i]) for i, image_id in enumerate(ids)]
        wall = time.perf_counter()
        index_dir = os.path.join(work, "index")
        _, info = build_index_in_process(index_dir, rows, model_version=VERSION, dimension=128, overwrite=True)
        build_s = time.perf_counter() - wall
        del rows
        pairs_uri = f"duckdb:{os.path.join(work, 'pairs.duckdb')}"
        wall, cpu = time.perf_counter(), _cpu_seconds()
        done = job.run(["--index_dir", index_dir, "--warehouse", pairs_uri, "--threshold", str(THRESHOLD),
                        "--write_disposition", "truncate"])
        wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
        engine = sq.open_engine(f"{pairs_uri}#near_duplicates")
        try:
            found = {tuple(r) for r in sq.run_sql(engine, "SELECT image_id_a, image_id_b FROM {raw_table}").rows}
        finally:
            engine.close()
        print(f"index route: build {build_s:.1f} s, job {wall:.1f} s, {len(found)} pairs", flush=True)
        lines.append(f"| `build-index` library, then `near-duplicates --threshold 0.95` (Beam, in process) | "
                     f"{info.shards[0].params.algorithm}, {info.shards[0].params.num_leaves} leaves, tuned "
                     f"{info.search.to_dict()}; index build + tuning {build_s:.0f} s | {wall:.1f} | {cpu:.1f} | "
                     f"{len(found)} | {len(planted & set(found))} / {len(planted)} |")
        del done
    text = "\n".join(lines)
    print(text)
    if not args.no_doc:
        write_section(f"near_duplicates_{len(ids)}", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
