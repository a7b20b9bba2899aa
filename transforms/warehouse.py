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
  own files are written, deletes the table's older files (truncate).
- ``duckdb:PATH``: DuckDB files allow one writer at a time, so parallel
  workers never touch the database: they write Parquet shards to a staging
  directory beside it, and one final step, which receives the list of all
  shards, loads them into the table in a single transaction and removes them.
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
from schemas.warehouse import WRITE_DISPOSITIONS, TableSpec, WarehouseUri, WriteDisposition, parse_warehouse_uri
from transforms.dead_letters import METRICS_NAMESPACE

_LOGGER = logging.getLogger(__name__)

PARQUET_SUFFIX = ".parquet"
STAGING_SUFFIX = ".staging"


def parquet_table_dir(warehouse: WarehouseUri) -> str:
    """Directory holding a Parquet warehouse table's files."""
    return FileSystems.join(warehouse.location, warehouse.table)


def parquet_table_glob(warehouse: WarehouseUri) -> str:
    """Glob matching every file of a Parquet warehouse table."""
    return FileSystems.join(parquet_table_dir(warehouse), f"*{PARQUET_SUFFIX}")


def duckdb_staging_dir(warehouse: WarehouseUri) -> str:
    """Where a DuckDB warehouse's Parquet shards wait to be loaded."""
    return f"{warehouse.location}{STAGING_SUFFIX}"


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
    """For truncate: after a run's files are written, deletes every other file of the table."""

    def __init__(self, table_glob: str):
        self._table_glob = table_glob

    def process(self, written: list[str]) -> Iterable[str]:
        keep = {os.path.basename(path) for path in written}
        matches = FileSystems.match([self._table_glob])[0].metadata_list
        stale = [m.path for m in matches if os.path.basename(m.path) not in keep]
        if stale:
            FileSystems.delete(stale)
        _LOGGER.info("Truncated %s: removed %d older files", self._table_glob, len(stale))
        yield from sorted(stale)


def load_parquet_into_duckdb(
    database: str, table: str, files: list[str], write_disposition: WriteDisposition
) -> int:
    """Loads Parquet files into a DuckDB table in one transaction.

    Args:
      database: DuckDB file path (created if missing).
      table: Table name, already validated by ``parse_warehouse_uri``.
      files: Parquet files with the table's schema.
      write_disposition: ``append`` adds rows (creating the table if needed);
        ``truncate`` replaces the table's contents.

    Returns:
      Number of rows loaded.
    """
    import duckdb

    directory = os.path.dirname(os.path.abspath(database))
    os.makedirs(directory, exist_ok=True)
    connection = duckdb.connect(database)
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
    """Loads the staged Parquet shards of one run into the DuckDB table, then removes them.

    Receives one element, the list of every shard, so exactly one worker
    opens the database file however many wrote shards.
    """

    def __init__(self, database: str, table: str, write_disposition: WriteDisposition):
        self._database = database
        self._table = table
        self._write_disposition = write_disposition

    def process(self, files: list[str]) -> Iterable[int]:
        loaded = load_parquet_into_duckdb(self._database, self._table, files, self._write_disposition)
        FileSystems.delete(sorted(files))
        _LOGGER.info("Loaded %d rows from %d shards into %s table %s", loaded, len(files), self._database, self._table)
        yield loaded


class WriteToWarehouse(beam.PTransform):
    """Writes record dicts to the warehouse table a URI names.

    Input: PCollection of dicts with exactly ``table_spec.record``'s fields.
    Output: PDone.
    """

    def __init__(
        self,
        warehouse_uri: str,
        table_spec: TableSpec,
        *,
        write_disposition: WriteDisposition = "append",
    ):
        super().__init__()
        if write_disposition not in WRITE_DISPOSITIONS:
            raise ValueError(f"write_disposition must be one of {WRITE_DISPOSITIONS}. "
                             f"Received `write_disposition={write_disposition}`")
        self._warehouse = parse_warehouse_uri(warehouse_uri, table_spec.default_table)
        self._spec = table_spec
        self._write_disposition = write_disposition

    @property
    def warehouse(self) -> WarehouseUri:
        return self._warehouse

    def expand(self, rows: beam.PCollection[dict[str, Any]]) -> beam.pvalue.PDone:
        record = self._spec.record
        checked = rows | "CheckRows" >> beam.ParDo(CheckRowsFn(record, f"{self._warehouse.table}_rows_written"))
        streaming = rows.pipeline.options.view_as(StandardOptions).streaming
        if self._warehouse.kind == "bigquery":
            self._write_bigquery(checked, streaming=bool(streaming))
            return beam.pvalue.PDone(rows.pipeline)
        if streaming:
            raise ValueError(f"{self._warehouse.kind} warehouses are batch-only; streaming jobs write bigquery:")
        run_token = _new_run_token()
        if self._warehouse.kind == "parquet":
            written = checked | "WriteParquet" >> self._write_parquet(
                FileSystems.join(parquet_table_dir(self._warehouse), f"part-{run_token}")
            )
            if self._write_disposition == "truncate":
                _ = (
                    written
                    | "CollectWrittenFiles" >> beam.combiners.ToList()
                    | "DeleteStaleFiles" >> beam.ParDo(DeleteStaleFilesFn(parquet_table_glob(self._warehouse)))
                )
            return beam.pvalue.PDone(rows.pipeline)
        staged = checked | "StageParquet" >> self._write_parquet(
            FileSystems.join(duckdb_staging_dir(self._warehouse), run_token, "part")
        )
        _ = (
            staged
            | "CollectStagedFiles" >> beam.combiners.ToList()
            | "LoadIntoDuckDB"
            >> beam.ParDo(LoadIntoDuckDBFn(self._warehouse.location, self._warehouse.table, self._write_disposition))
        )
        return beam.pvalue.PDone(rows.pipeline)

    def _write_parquet(self, prefix: str) -> beam.PTransform:
        return beam.io.WriteToParquet(
            prefix,
            schema=self._spec.record.arrow_schema(),
            codec="snappy",
            file_name_suffix=PARQUET_SUFFIX,
        )

    def _write_bigquery(self, rows: beam.PCollection[dict[str, Any]], *, streaming: bool) -> None:
        from apache_beam.io.gcp.internal.clients.bigquery import TableReference

        bq = beam.io.BigQueryDisposition
        method = beam.io.WriteToBigQuery.Method
        reference = TableReference(
            projectId=self._warehouse.bigquery_project,
            datasetId=self._warehouse.bigquery_dataset,
            tableId=self._warehouse.table,
        )
        _ = (
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


class WriteEmbeddings(WriteToWarehouse):
    """Writes embedding rows (``schemas.embedding.EMBEDDING_RECORD`` dicts) to a warehouse."""

    def __init__(self, warehouse_uri: str, *, write_disposition: WriteDisposition = "append"):
        super().__init__(warehouse_uri, EMBEDDINGS_TABLE, write_disposition=write_disposition)
