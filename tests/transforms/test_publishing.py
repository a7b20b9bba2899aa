"""Publishing a run from inside the pipeline: only after every sink has written, never after a failed check.

The checks below run inside the pipeline's publishing step and look at the
real outputs (files on disk, the DuckDB table, the Parquet table, the
BigQuery emulator's table): if a sink's completion signal arrived before its
output was complete, they would see missing files or rows and fail the job.
"""

from __future__ import annotations

import functools
import glob
import os

import apache_beam as beam
import duckdb
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from schemas import publication
from schemas.embedding import EMBEDDINGS_TABLE
from schemas.publication import OutputRun, published_dir
from schemas.warehouse import parquet_table_glob, parse_warehouse_uri
from tests.fixtures import warehouses as wh
from transforms.dead_letters import WriteDeadLetters, counter_total
from transforms.publishing import (
    PUBLISHED_COUNTER,
    NotPublishedError,
    PublishWhenWritten,
    failure_of,
    finish,
    launch,
)
from transforms.runner_policy import LOCAL_BATCH_RUNNER
from transforms.warehouse import WriteEmbeddings

LINES = [f"line {i}" for i in range(40)]


class CheckFailed(RuntimeError):
    """What the test checks raise."""


def table_rows(uri: str, bigquery_host: str | None) -> list[str]:
    """The image_ids a warehouse table holds, read the way a user would."""
    warehouse = parse_warehouse_uri(uri, EMBEDDINGS_TABLE.default_table)
    if warehouse.kind == "duckdb":
        if not os.path.exists(warehouse.location):
            return []
        with duckdb.connect(warehouse.location, read_only=True) as connection:
            return sorted(r[0] for r in connection.execute(f'SELECT image_id FROM "{warehouse.table}"').fetchall())
    if warehouse.kind == "parquet":
        import pyarrow.parquet as pq

        return sorted(i for f in glob.glob(parquet_table_glob(warehouse)) for i in pq.read_table(f)["image_id"].to_pylist())
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    client = bigquery.Client(project=warehouse.bigquery_project, credentials=AnonymousCredentials(),
                             client_options=ClientOptions(api_endpoint=bigquery_host))
    return sorted(r["image_id"] for r in client.query(f"SELECT image_id FROM `{warehouse.location}`").result())


def everything_written(run_dir: str, uri: str, expected_ids: list[str], bigquery_host: str | None, *,
                       text: list[str], dead_letters: list[str], table: list) -> None:
    """The publishing step's check: every file and row is already where readers look."""
    if not text or not all(os.path.exists(path) for path in text + dead_letters):
        raise CheckFailed(f"files missing when publishing: {text + dead_letters}")
    lines = sorted(line for path in text for line in open(path).read().splitlines())
    if lines != sorted(LINES):
        raise CheckFailed(f"{len(lines)} of {len(LINES)} lines written when publishing")
    if not table or table_rows(uri, bigquery_host) != expected_ids:
        raise CheckFailed(f"the table holds {table_rows(uri, bigquery_host)} when publishing; signal {table}")
    if publication.read_pointer(os.path.dirname(run_dir)) == os.path.basename(run_dir):
        raise CheckFailed("published before the check ran")


def refuse(**_: list) -> None:
    raise CheckFailed("read 3 != indexed 1 + rejected 1; the index was not published")


def build(run: OutputRun, uri: str, rows: list[dict], args: list[str], check) -> beam.Pipeline:
    pipeline = beam.Pipeline(runner=LOCAL_BATCH_RUNNER, options=PipelineOptions(args))
    written = {
        "text": pipeline | "Lines" >> beam.Create(LINES) | "WriteText" >> beam.io.WriteToText(
            FileSystems.join(run.run_dir, "part"), num_shards=3),
        "dead_letters": pipeline | "NoLetters" >> beam.Create([]) | "WriteDeadLetters" >> WriteDeadLetters(run.run_dir),
        "table": pipeline | "Rows" >> beam.Create(rows) | "WriteTable" >> WriteEmbeddings(
            uri, write_disposition="truncate"),
    }
    _ = written | "Publish" >> PublishWhenWritten(run, check=check)
    return pipeline


@pytest.mark.parametrize("kind", ["duckdb", "parquet", "bigquery"])
def test_the_run_is_published_only_once_every_sink_has_written(kind: str, tmp_path, request) -> None:
    args, host = [], None
    if kind == "bigquery":
        emulator = request.getfixturevalue("bigquery_emulator")
        uri = f"bigquery:{emulator.create_dataset()}.embeddings"
        args, host = [f"--temp_location=gs://{emulator.gcs.create_bucket()}/tmp", f"--project={emulator.project}"], \
            emulator.host
    else:
        uri = f"{kind}:{tmp_path / ('w.duckdb' if kind == 'duckdb' else 'parquet')}"
    wh.write_rows(wh.v2_rows()[:5], uri, args)  # Truncated by the run: the check sees only the new rows.
    rows = wh.v1_rows()[:12]
    out = str(tmp_path / "out")
    previous = OutputRun.start(out, overwrite=False)
    open(os.path.join(previous.run_dir, "old.txt"), "w").write("old")
    previous.publish()
    run = OutputRun.start(out, overwrite=True)
    check = functools.partial(everything_written, run.run_dir, uri, sorted(r["image_id"] for r in rows), host)

    result = finish(launch(build(run, uri, rows, args, check), [run]))

    assert published_dir(out) == run.run_dir
    assert os.path.exists(os.path.join(run.run_dir, publication.SUCCESS_FILE))
    assert os.path.isdir(previous.run_dir)  # Kept for readers that resolved it a moment ago.
    assert counter_total(result, PUBLISHED_COUNTER) == 1


def test_a_check_that_raises_publishes_nothing_and_the_launcher_abandons_the_run(tmp_path) -> None:
    out, uri = str(tmp_path / "out"), f"duckdb:{tmp_path / 'w.duckdb'}"
    previous = OutputRun.start(out, overwrite=False)
    open(os.path.join(previous.run_dir, "old.txt"), "w").write("old")
    previous.publish()
    run = OutputRun.start(out, overwrite=True)
    seen: list[BaseException] = []

    with pytest.raises(CheckFailed) as raised:
        finish(launch(build(run, uri, wh.v1_rows()[:3], [], refuse), [run], explain=seen.append))

    assert published_dir(out) == previous.run_dir
    assert not os.path.exists(run.run_dir)
    assert seen == [raised.value]
    assert failure_of(raised.value, CheckFailed) == "read 3 != indexed 1 + rejected 1; the index was not published"


def test_a_pipeline_that_never_publishes_fails_the_launchers_verification(tmp_path) -> None:
    run = OutputRun.start(str(tmp_path / "out"), overwrite=False)
    pipeline = beam.Pipeline(runner=LOCAL_BATCH_RUNNER)
    _ = pipeline | beam.Create(LINES) | beam.io.WriteToText(FileSystems.join(run.run_dir, "part"))
    with pytest.raises(NotPublishedError, match="did not publish"):
        finish(launch(pipeline, [run]))
    assert published_dir(str(tmp_path / "out")) == str(tmp_path / "out")


@pytest.mark.parametrize("text", [
    # The in-process runner's fallback when the type cannot be rebuilt with one argument.
    "CheckFailed: read 3 != indexed 1 + rejected 1 [while running 'PublishIndex/PublishRuns']",
    # A portable runner or Dataflow: the worker's traceback inside the job's error.
    "Pipeline job-1 failed in state FAILED: Traceback (most recent call last):\n  File \"x.py\", line 1\n"
    "tests.transforms.test_publishing.CheckFailed: read 3 != indexed 1 + rejected 1 "
    "[while running 'PublishIndex/PublishRuns']\n\nDuring handling ...",
])
def test_failure_of_finds_the_checks_message_in_a_runners_error(text: str) -> None:
    assert failure_of(RuntimeError(text), CheckFailed) == "read 3 != indexed 1 + rejected 1"
    assert failure_of(RuntimeError(text), NotPublishedError) is None
    assert failure_of(RuntimeError("worker lost"), CheckFailed) is None
