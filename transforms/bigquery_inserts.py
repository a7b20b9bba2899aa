"""Streaming rows into BigQuery once per id (stream_predict's optional sink).

Beam's ``WriteToBigQuery(method=STREAMING_INSERTS)`` gives every row a random
insert id, so the same input arriving twice would land twice. Two layers stop
that, both keyed by the row's own id (stream_predict's: the digest of the
input message's content, equal for a redelivery and for the same message
published twice):

- in the pipeline, rows whose id was already seen within ``dedup_secs`` of
  processing time are dropped before the insert (Beam's
  ``DeduplicatePerKey``: per-key state, so it scales out like the rest of
  the branch; the state of a key is cleared when its time is up);
- the insert itself calls ``tabledata.insertAll`` with the id as
  ``insertId``, which BigQuery uses for best-effort de-duplication within
  about a minute: a bundle the runner retries after a failed insert, or a
  second worker's copy. Failed inserts raise, so the runner retries the
  bundle with the same ids instead of dropping rows.
"""

from __future__ import annotations

from typing import Any, Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.deduplicate import DeduplicatePerKey
from apache_beam.utils.timestamp import Duration

from schemas.warehouse import TableSpec
from transforms.dead_letters import METRICS_NAMESPACE
from transforms.warehouse import to_bigquery_row

DEFAULT_INSERT_BATCH = 500  # insertAll's recommended maximum rows per request.
DEFAULT_DEDUP_SECS = 600.0


class BigQueryInsertError(RuntimeError):
    """BigQuery refused rows of an insertAll request."""


class InsertRowsFn(beam.DoFn):
    """Buffers a bundle's rows and inserts them with ``insertId = row[id_field]``.

    Args:
      table: ``PROJECT.DATASET.TABLE``; created with the spec's schema,
        partitioning and clustering if missing.
      spec: The table's record and layout.
      id_field: The column whose value is each row's insert id.
      batch_size: Rows per insertAll request.
    """

    def __init__(self, table: str, spec: TableSpec, id_field: str, batch_size: int = DEFAULT_INSERT_BATCH):
        spec.record.field(id_field)  # Fails now on a typo, not on the first row.
        self._table = table
        self._spec = spec
        self._id_field = id_field
        self._batch_size = batch_size

    def setup(self) -> None:
        from google.cloud import bigquery

        project = self._table.split(".", 1)[0]
        self._client = bigquery.Client(project=project)
        schema = [bigquery.SchemaField.from_api_repr(f) for f in self._spec.record.bigquery_schema()["fields"]]
        table = bigquery.Table(self._table, schema=schema)
        parameters = self._spec.bigquery_table_parameters()
        if "timePartitioning" in parameters:
            table.time_partitioning = bigquery.TimePartitioning(field=parameters["timePartitioning"]["field"])
        if "clustering" in parameters:
            table.clustering_fields = parameters["clustering"]["fields"]
        self._client.create_table(table, exists_ok=True)
        self._inserted = Metrics.counter(METRICS_NAMESPACE, "bigquery_rows_inserted")

    def start_bundle(self) -> None:
        self._rows: list[dict[str, Any]] = []

    def process(self, row: dict[str, Any]) -> Iterable[None]:
        self._rows.append(row)
        if len(self._rows) >= self._batch_size:
            self._flush()
        return []

    def finish_bundle(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        errors = self._client.insert_rows_json(
            self._table,
            [to_bigquery_row(row, self._spec.record) for row in rows],
            row_ids=[str(row[self._id_field]) for row in rows],
        )
        if errors:
            raise BigQueryInsertError(f"BigQuery refused rows of {self._table}: {str(errors)[:2000]}")
        self._inserted.inc(len(rows))


class InsertRowsWithIds(beam.PTransform):
    """Streams rows into a BigQuery table, one per ``id_field`` value within ``dedup_secs``.

    Args:
      table: ``PROJECT.DATASET.TABLE``.
      spec: The table's record and layout.
      id_field: The column whose value identifies a row (and is its insert id).
      dedup_secs: Processing-time seconds a seen id is remembered; 0 keeps
        only BigQuery's own (best effort, about a minute) de-duplication.
    """

    def __init__(self, table: str, spec: TableSpec, id_field: str, dedup_secs: float = DEFAULT_DEDUP_SECS):
        super().__init__()
        if dedup_secs < 0:
            raise ValueError(f"dedup_secs must be >= 0. Received `dedup_secs={dedup_secs}`")
        self._fn = InsertRowsFn(table, spec, id_field)
        self._id_field = id_field
        self._dedup_secs = dedup_secs

    def expand(self, rows: beam.PCollection[dict[str, Any]]) -> beam.PCollection[None]:
        if self._dedup_secs:
            id_field = self._id_field
            rows = (
                rows
                | "KeyById" >> beam.Map(lambda row: (str(row[id_field]), row))
                | "DropSeenIds" >> DeduplicatePerKey(processing_time_duration=Duration(seconds=self._dedup_secs))
                | "Rows" >> beam.Values()
            )
        return rows | "InsertRows" >> beam.ParDo(self._fn)
