"""Writing rows of a ``schemas`` record to a warehouse: BigQuery, a DuckDB file or Parquet files.

``WriteToWarehouse(uri, table_spec)`` takes a PCollection of dicts with exactly
the record's fields (Python values: ``str``, ``None`` for absent nullable
values, lists of floats, timezone-aware ``datetime``) and writes them to the
table ``uri`` names (``schemas.warehouse`` documents the URI forms).
``WriteEmbeddings`` is the same sink fixed to the embedding row;
batch_predict reuses ``WriteToWarehouse`` with the prediction record.

- ``bigquery:``: Beam's WriteToBigQuery with FILE_LOADS in batch (stages
  newline-delimited JSON under ``--temp_location``; STREAMING_INSERTS in
  streaming pipelines; never STORAGE_WRITE_API, which needs a Java expansion
  service). The table is created if needed with the schema, day partitioning
  and clustering of the ``TableSpec``.
- ``parquet:DIR``: Parquet shards ``DIR/TABLE/part-<run>-SSSSS-of-NNNNN.parquet``
  with the record's Arrow schema; a new run adds files (append) or, once its
  own files are written, deletes the table files that existed when its
  pipeline was built (truncate). Files a concurrent writer adds meanwhile
  are never deleted.
- ``duckdb:PATH``: DuckDB files allow one writer at a time, so parallel
  workers never touch the database: they write Parquet shards to a staging
  directory beside it, and one final step, which receives the list of all
  shards, loads them into the table in a single transaction and removes them.
  While another process holds the file (an open ``sql`` session, another
  load) that step waits, up to ``duckdb_lock_timeout_s``; if the lock never
  comes it removes the run's staged shards and fails with
  ``WarehouseLockedError``.

Each returns a PCollection that is complete only once the table holds the
rows (the written Parquet files, after a truncate's deletions; the DuckDB
row count, after the load; BigQuery's load and copy job references, after
the jobs finished), so a job can publish its run once it is
(``transforms.publishing``).

Appending the same images again (a rerun) adds rows; readers see the newest
row per ``(image_id, model_version)`` (``retrieval.sql_queries.latest_rows_sql``).
"""

from __future__ import annotations

import datetime
import logging
import os
import time
import uuid
from typing import Any, Iterable

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import StandardOptions

from schemas.embedding import EMBEDDINGS_TABLE
from schemas.fields import RecordSchema
from schemas.warehouse import (
    PARQUET_SUFFIX,
    WRITE_DISPOSITIONS,
    TableSpec,
    WarehouseUri,
    WriteDisposition,
    duckdb_staging_dir,
    list_table_files,
    parquet_table_dir,
    parquet_table_glob,
    parse_warehouse_uri,
)
from transforms.dead_letters import METRICS_NAMESPACE

_LOGGER = logging.getLogger(__name__)

DEFAULT_DUCKDB_LOCK_TIMEOUT_S = 120.0  # Long enough for an interactive sql session to finish its query.
_LOCK_RETRY_FIRST_S = 0.1
_LOCK_RETRY_MAX_S = 5.0


class WarehouseLockedError(RuntimeError):
    """The DuckDB warehouse file stayed locked by another process for the whole wait."""


def _new_run_token() -> str:
    """A name part unique to one pipeline run, so runs never overwrite each other's files."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def check_row(row: dict[str, Any], record: RecordSchema) -> dict[str, Any]:
    """Validates that a row has exactly the record's fields and required values.

    Rows are built by the job, not read from users, so a mismatch is a bug in
    the job: it raises instead of becoming a dead letter.

    Raises:
      ValueError: Missing or extra keys, or None in a required column.
    """
    names = record.names
    if set(row) != set(names):
        raise ValueError(
            f"{record.name} row has keys {sorted(row)}; expected {sorted(names)}"
        )
    for field in record.fields:
        value = row[field.name]
        if value is None and not (field.nullable or field.repeated):
            raise ValueError(f"{record.name}.{field.name} is required; row {row.get(names[0])!r} has None")
        if field.kind == "timestamp" and value is not None:
            if not isinstance(value, datetime.datetime) or value.tzinfo is None:
                raise ValueError(f"{record.name}.{field.name} must be a timezone-aware datetime. Received {value!r}")
    return row


def _bigquery_value(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "timestamp":
        return value.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f UTC")
    if kind == "float":
        return float(value)
    if kind == "int64":
        return int(value)
    return value


def to_bigquery_row(row: dict[str, Any], record: RecordSchema) -> dict[str, Any]:
    """Converts a row to the JSON-ready form BigQuery load jobs and inserts accept."""
    converted: dict[str, Any] = {}
    for field in record.fields:
        value = row[field.name]
        if field.repeated:
            converted[field.name] = [_bigquery_value(v, field.kind) for v in (value or [])]
        else:
            converted[field.name] = _bigquery_value(value, field.kind)
    return converted


class CheckRowsFn(beam.DoFn):
    """Validates rows against the record and counts them in Beam metrics."""

    def __init__(self, record: RecordSchema, counter_name: str):
        self._record = record
        self._counter_name = counter_name

    def setup(self) -> None:
        self._rows = Metrics.counter(METRICS_NAMESPACE, self._counter_name)

    def process(self, row: dict[str, Any]) -> Iterable[dict[str, Any]]:
        self._rows.inc()
        yield check_row(row, self._record)


class DeleteStaleFilesFn(beam.DoFn):
    """For truncate: after a run's files are written, deletes the table files that predate the run.

    Yields the run's own files once the stale ones are gone, so what follows
    sees the truncated table.

    ``snapshot`` is the table's file list taken when the pipeline was built.
    Only those files are deleted (the ones still there: a concurrent
    truncate may have removed some), so shards a concurrent writer added
    after that moment survive; re-listing the table at this point would
    delete them.
    """

    def __init__(self, table_glob: str, snapshot: list[str]):
        self._table_glob = table_glob
        self._snapshot = sorted(snapshot)

    def process(self, written: list[str]) -> Iterable[str]:
        keep = {os.path.basename(path) for path in written}
        present = {os.path.basename(path) for path in list_table_files(self._table_glob)}
        stale = [path for path in self._snapshot
                 if os.path.basename(path) in present and os.path.basename(path) not in keep]
        if stale:
            FileSystems.delete(stale)
        _LOGGER.info("Truncated %s: removed %d files older than this run", self._table_glob, len(stale))
        yield from sorted(written)


def _is_lock_conflict(error: Exception) -> bool:
    # DuckDB reports another process's lock as an IOException "Could not set
    # lock on file ...: Conflicting lock is held ..."; it has no own type.
    return "lock" in str(error).lower()


def connect_waiting_for_lock(database: str, timeout_s: float) -> Any:
    """Opens a DuckDB file for writing, retrying with backoff while another process holds its lock.

    Args:
      database: DuckDB file path (created if missing).
      timeout_s: How long to keep trying; 0 tries once.

    Returns:
      A read-write ``duckdb`` connection.

    Raises:
      WarehouseLockedError: Still locked after ``timeout_s``; the message
        says how long it waited.
      duckdb.Error: Any other failure to open the file.
    """
    import duckdb

    started = time.monotonic()
    delay = _LOCK_RETRY_FIRST_S
    while True:
        try:
            return duckdb.connect(database)
        except duckdb.IOException as error:
            if not _is_lock_conflict(error):
                raise
            waited = time.monotonic() - started
            if waited >= timeout_s:
                reason = str(error).strip().splitlines()[0]
                raise WarehouseLockedError(
                    f"DuckDB warehouse {database} was locked by another process (an open `vision-pipelines sql` "
                    f"session or another load?); waited {waited:.1f} s (limit {timeout_s:g} s). {reason}"
                ) from error
            _LOGGER.info("DuckDB warehouse %s is locked; retrying in %.1f s", database, delay)
            time.sleep(min(delay, timeout_s - waited))
            delay = min(2 * delay, _LOCK_RETRY_MAX_S)


def load_parquet_into_duckdb(
    database: str,
    table: str,
    files: list[str],
    write_disposition: WriteDisposition,
    *,
    lock_timeout_s: float = DEFAULT_DUCKDB_LOCK_TIMEOUT_S,
) -> int:
    """Loads Parquet files into a DuckDB table in one transaction.

    Args:
      database: DuckDB file path (created if missing).
      table: Table name, already validated by ``parse_warehouse_uri``.
      files: Parquet files with the table's schema.
      write_disposition: ``append`` adds rows (creating the table if needed);
        ``truncate`` replaces the table's contents.
      lock_timeout_s: How long to wait for another process's lock on the file.

    Returns:
      Number of rows loaded.

    Raises:
      WarehouseLockedError: The file stayed locked for ``lock_timeout_s``.
    """
    directory = os.path.dirname(os.path.abspath(database))
    os.makedirs(directory, exist_ok=True)
    connection = connect_waiting_for_lock(database, lock_timeout_s)
    files = sorted(files)
    try:
        connection.begin()
        exists = connection.execute(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = $table AND table_schema = 'main'",
            {"table": table},
        ).fetchall()[0][0]
        if exists and write_disposition == "truncate":
            connection.execute(f'DROP TABLE "{table}"')
            exists = 0
        if not exists:
            connection.execute(f'CREATE TABLE "{table}" AS SELECT * FROM read_parquet($files) LIMIT 0', {"files": files})
        loaded = connection.execute(
            f'INSERT INTO "{table}" BY NAME SELECT * FROM read_parquet($files)', {"files": files}
        ).fetchall()[0][0]
        connection.commit()
    except BaseException:
        connection.rollback()
        raise
    finally:
        connection.close()
    return loaded


class LoadIntoDuckDBFn(beam.DoFn):
    """Loads the staged Parquet shards of one run into the DuckDB table, then removes the run's staging.

    Receives one element, the list of every shard, so exactly one worker
    opens the database file however many wrote shards. The run's staging
    directory goes whether the load succeeds or fails (a lock that never
    came, a bad shard), so no failed run leaves shards behind.
    """

    def __init__(
        self,
        database: str,
        table: str,
        write_disposition: WriteDisposition,
        *,
        staging_dir: str,
        lock_timeout_s: float = DEFAULT_DUCKDB_LOCK_TIMEOUT_S,
    ):
        self._database = database
        self._table = table
        self._write_disposition = write_disposition
        self._staging_dir = staging_dir
        self._lock_timeout_s = lock_timeout_s

    def process(self, files: list[str]) -> Iterable[int]:
        try:
            loaded = load_parquet_into_duckdb(self._database, self._table, files, self._write_disposition,
                                              lock_timeout_s=self._lock_timeout_s)
        finally:
            if FileSystems.exists(self._staging_dir):
                FileSystems.delete([self._staging_dir])
        _LOGGER.info("Loaded %d rows from %d shards into %s table %s", loaded, len(files), self._database, self._table)
        yield loaded


class WriteToWarehouse(beam.PTransform):
    """Writes record dicts to the warehouse table a URI names.

    Input: PCollection of dicts with exactly ``table_spec.record``'s fields.
    Output: a PCollection complete only once the table holds the rows: the
    written Parquet file paths (``parquet:``), the loaded row count
    (``duckdb:``), ``(destination, JobReference)`` of BigQuery's finished
    load and copy jobs (``bigquery:`` in batch). In a streaming pipeline
    (``bigquery:`` only) it is the rows BigQuery refused, and never complete.
    """

    def __init__(
        self,
        warehouse_uri: str,
        table_spec: TableSpec,
        *,
        write_disposition: WriteDisposition = "append",
        duckdb_lock_timeout_s: float = DEFAULT_DUCKDB_LOCK_TIMEOUT_S,
    ):
        """Checks the arguments; nothing is written until the pipeline runs.

        Args:
          warehouse_uri: ``bigquery:``, ``duckdb:`` or ``parquet:`` URI.
          table_spec: The record and its table layout.
          write_disposition: ``append`` or ``truncate``.
          duckdb_lock_timeout_s: ``duckdb:`` only: how long the final load
            waits for another process to release the file.

        Raises:
          ValueError: Unknown disposition, negative timeout or a bad URI.
        """
        super().__init__()
        if write_disposition not in WRITE_DISPOSITIONS:
            raise ValueError(f"write_disposition must be one of {WRITE_DISPOSITIONS}. "
                             f"Received `write_disposition={write_disposition}`")
        if not 0 <= duckdb_lock_timeout_s <= 24 * 3600:
            raise ValueError(f"duckdb_lock_timeout_s must be >= 0 and <= 86400. "
                             f"Received `duckdb_lock_timeout_s={duckdb_lock_timeout_s}`")
        self._warehouse = parse_warehouse_uri(warehouse_uri, table_spec.default_table)
        self._spec = table_spec
        self._write_disposition = write_disposition
        self._duckdb_lock_timeout_s = duckdb_lock_timeout_s

    @property
    def warehouse(self) -> WarehouseUri:
        return self._warehouse

    def expand(self, rows: beam.PCollection[dict[str, Any]]) -> beam.PCollection:
        record = self._spec.record
        checked = rows | "CheckRows" >> beam.ParDo(CheckRowsFn(record, f"{self._warehouse.table}_rows_written"))
        streaming = rows.pipeline.options.view_as(StandardOptions).streaming
        if self._warehouse.kind == "bigquery":
            return self._write_bigquery(checked, streaming=bool(streaming))
        if streaming:
            raise ValueError(f"{self._warehouse.kind} warehouses are batch-only; streaming jobs write bigquery:")
        run_token = _new_run_token()
        if self._warehouse.kind == "parquet":
            written = checked | "WriteParquet" >> self._write_parquet(
                FileSystems.join(parquet_table_dir(self._warehouse), f"part-{run_token}")
            )
            if self._write_disposition == "truncate":
                table_glob = parquet_table_glob(self._warehouse)
                # Snapshot now, while the pipeline is built: what truncate replaces.
                snapshot = list_table_files(table_glob)
                return (
                    written
                    | "CollectWrittenFiles" >> beam.combiners.ToList()
                    | "DeleteStaleFiles" >> beam.ParDo(DeleteStaleFilesFn(table_glob, snapshot))
                )
            return written
        staging_dir = FileSystems.join(duckdb_staging_dir(self._warehouse), run_token)
        staged = checked | "StageParquet" >> self._write_parquet(FileSystems.join(staging_dir, "part"))
        return (
            staged
            | "CollectStagedFiles" >> beam.combiners.ToList()
            | "LoadIntoDuckDB"
            >> beam.ParDo(LoadIntoDuckDBFn(self._warehouse.location, self._warehouse.table, self._write_disposition,
                                           staging_dir=staging_dir, lock_timeout_s=self._duckdb_lock_timeout_s))
        )

    def _write_parquet(self, prefix: str) -> beam.PTransform:
        return beam.io.WriteToParquet(
            prefix,
            schema=self._spec.record.arrow_schema(),
            codec="snappy",
            file_name_suffix=PARQUET_SUFFIX,
        )

    def _write_bigquery(self, rows: beam.PCollection[dict[str, Any]], *, streaming: bool) -> beam.PCollection:
        """Writes with FILE_LOADS in batch, STREAMING_INSERTS in streaming; see ``expand`` for what it returns.

        In Beam 2.77 ``destination_load_jobid_pairs`` is emitted when a load
        job starts, but the step emitting it waits for every job it started
        in ``finish_bundle`` (and fails if one failed), so the PCollection is
        complete only after the loads finished; ``destination_copy_jobid_pairs``
        (the temp-table path for large loads) is emitted after the copy jobs
        finished. Their union completes when the table holds every row.
        """
        from apache_beam.io.gcp.internal.clients.bigquery import TableReference

        bq = beam.io.BigQueryDisposition
        method = beam.io.WriteToBigQuery.Method
        reference = TableReference(
            projectId=self._warehouse.bigquery_project,
            datasetId=self._warehouse.bigquery_dataset,
            tableId=self._warehouse.table,
        )
        result = (
            rows
            | "FormatBigQueryRows" >> beam.Map(to_bigquery_row, record=self._spec.record)
            | "WriteBigQuery"
            >> beam.io.WriteToBigQuery(
                reference,
                schema=self._spec.record.bigquery_schema(),
                method=method.STREAMING_INSERTS if streaming else method.FILE_LOADS,
                create_disposition=bq.CREATE_IF_NEEDED,
                write_disposition=bq.WRITE_TRUNCATE if self._write_disposition == "truncate" else bq.WRITE_APPEND,
                additional_bq_parameters=self._spec.bigquery_table_parameters(),
            )
        )
        if streaming:
            return result.failed_rows
        return (
            (result.destination_load_jobid_pairs, result.destination_copy_jobid_pairs)
            | "FlattenBigQueryJobs" >> beam.Flatten()
        )


class WriteEmbeddings(WriteToWarehouse):
    """Writes embedding rows (``schemas.embedding.EMBEDDING_RECORD`` dicts) to a warehouse."""

    def __init__(
        self,
        warehouse_uri: str,
        *,
        write_disposition: WriteDisposition = "append",
        duckdb_lock_timeout_s: float = DEFAULT_DUCKDB_LOCK_TIMEOUT_S,
    ):
        super().__init__(warehouse_uri, EMBEDDINGS_TABLE, write_disposition=write_disposition,
                         duckdb_lock_timeout_s=duckdb_lock_timeout_s)
