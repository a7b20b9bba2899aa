"""Reading embedding rows back from a warehouse: the reader beside ``transforms.warehouse``'s writer.

``ReadFromWarehouse(uri, model_version=...)`` yields ``schemas.embedding``
rows (dicts with exactly ``EMBEDDING_RECORD``'s fields, ``created_at`` a UTC
datetime, ``embedding`` a list of floats) of one model_version, from the
*deduplicated* view every SQL query reads (``retrieval.sql_queries.latest_rows_sql``:
the newest row per ``(image_id, model_version)``), so an appended rerun is
read once.

Rows come through the same SQL engines the ``sql`` command uses (DuckDB
read-only for ``duckdb:`` and ``parquet:``; BigQuery with bound parameters
and the byte limit for ``bigquery:``). The read is split into partitions by a
hash of image_id, one query each, spread over workers by a Reshuffle, so no
worker holds more than one partition's rows at a time.

``describe_embeddings`` answers, before a pipeline is built, which
model_version will be read (the newest by default), how many rows it has and
their vector lengths, so a job can refuse an empty table or an unknown
version in one clear line.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics

from retrieval.sql_queries import (
    MODEL_VERSION_PARAM,
    QueryError,
    QueryParam,
    SqlEngine,
    newest_model_version,
    open_engine,
    render_sql,
    run_named_query,
)
from schemas import counters
from schemas.embedding import EMBEDDING, EMBEDDING_RECORD, IMAGE_ID, MODEL_VERSION
from schemas.exit_status import UnusableInputError
from transforms.dead_letters import METRICS_NAMESPACE

ROWS_PER_PARTITION = 100_000
READ_COUNTER = counters.READ

_MODEL_VERSION = QueryParam(MODEL_VERSION_PARAM, "string", "The model_version to read.")
_PARTITIONS = QueryParam("partitions", "int64", "How many partitions the read is split into.")
_PARTITION = QueryParam("partition", "int64", "The partition to read.")


class WarehouseReadError(UnusableInputError):
    """The warehouse cannot be read as asked: no rows, unknown model_version, or an engine failure (exit 3)."""


@dataclasses.dataclass(frozen=True)
class EmbeddingsSummary:
    """What one model_version of a warehouse holds.

    Attributes:
      model_version: The version (the newest when none was asked for).
      rows: Deduplicated rows of that version.
      dimensions: Vector length -> rows with it (more than one entry means
        some rows are malformed).
    """

    model_version: str
    rows: int
    dimensions: dict[int, int]

    @property
    def dimension(self) -> int:
        """The vector length most rows have (ties to the smaller length)."""
        return min(self.dimensions, key=lambda d: (-self.dimensions[d], d))


def _partition_predicate(engine: SqlEngine) -> str:
    if engine.dialect == "bigquery":
        return f"MOD(ABS(FARM_FINGERPRINT({IMAGE_ID})), @{_PARTITIONS.name}) = @{_PARTITION.name}"
    return f"hash({IMAGE_ID}) % ${_PARTITIONS.name} = ${_PARTITION.name}"


def _param(engine: SqlEngine, param: QueryParam) -> str:
    return f"@{param.name}" if engine.dialect == "bigquery" else f"${param.name}"


def partition_sql(engine: SqlEngine) -> str:
    """One partition of one model_version's deduplicated rows, in image_id order."""
    columns = ", ".join(EMBEDDING_RECORD.names)
    return render_sql(
        f"SELECT {columns} FROM {{table}} WHERE {MODEL_VERSION} = {_param(engine, _MODEL_VERSION)} "
        f"AND {_partition_predicate(engine)} ORDER BY {IMAGE_ID}", engine)


def _dimensions_sql(engine: SqlEngine) -> str:
    length = f"ARRAY_LENGTH({EMBEDDING})" if engine.dialect == "bigquery" else f"len({EMBEDDING})"
    return render_sql(
        f"SELECT COALESCE({length}, 0) AS dimension, COUNT(*) AS n FROM {{table}} "
        f"WHERE {MODEL_VERSION} = {_param(engine, _MODEL_VERSION)} GROUP BY dimension ORDER BY dimension", engine)


def _open(warehouse_uri: str) -> SqlEngine:
    try:
        return open_engine(warehouse_uri)
    except QueryError as error:
        raise WarehouseReadError(str(error)) from error


def describe_embeddings(warehouse_uri: str, model_version: str | None = None) -> EmbeddingsSummary:
    """Which model_version a read would get, its row count and vector lengths.

    Raises:
      WarehouseReadError: The table is missing or empty, or holds no rows of
        ``model_version`` (the message lists the versions it does hold).
    """
    engine = _open(warehouse_uri)
    try:
        try:
            version = model_version or newest_model_version(engine)
            result = engine.execute(_dimensions_sql(engine), [(_MODEL_VERSION, version)])
        except QueryError as error:
            raise WarehouseReadError(f"{warehouse_uri}: {error}") from error
        dimensions = {int(d): int(n) for d, n in result.rows}
        if not dimensions:
            versions = sorted(str(row[0]) for row in run_named_query(engine, "versions").rows)
            raise WarehouseReadError(f"{warehouse_uri} has no rows of model_version {version!r}; "
                                     f"it holds {versions or 'no rows at all'}")
        return EmbeddingsSummary(version, sum(dimensions.values()), dimensions)
    finally:
        engine.close()


def _row(columns: list[str], values: tuple[Any, ...]) -> dict[str, Any]:
    row = dict(zip(columns, values))
    row[EMBEDDING] = [float(v) for v in (row[EMBEDDING] or [])]
    return {name: row[name] for name in EMBEDDING_RECORD.names}


class ReadPartitionFn(beam.DoFn):
    """Partition number -> that partition's embedding rows; one engine per DoFn instance."""

    def __init__(self, warehouse_uri: str, model_version: str, partitions: int):
        self._warehouse_uri = warehouse_uri
        self._model_version = model_version
        self._partitions = partitions
        self._engine: SqlEngine | None = None

    def setup(self) -> None:
        self._engine = _open(self._warehouse_uri)
        self._read = Metrics.counter(METRICS_NAMESPACE, READ_COUNTER)

    def process(self, partition: int) -> Iterable[dict[str, Any]]:
        assert self._engine is not None
        result = self._engine.execute(partition_sql(self._engine), [
            (_MODEL_VERSION, self._model_version), (_PARTITIONS, self._partitions), (_PARTITION, partition)])
        for values in result.rows:
            self._read.inc()
            yield _row(result.columns, values)

    def teardown(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None


class ReadFromWarehouse(beam.PTransform):
    """Reads one model_version's deduplicated embedding rows from a warehouse.

    Input: the pipeline (a root transform). Output: PCollection of
    ``EMBEDDING_RECORD`` dicts, each counted in the ``read`` counter.
    """

    def __init__(self, warehouse_uri: str, *, model_version: str | None = None, rows: int | None = None):
        """Rows are read when the pipeline runs; the version and size are looked up now if not given.

        Args:
          warehouse_uri: ``duckdb:``, ``parquet:`` or ``bigquery:`` (``schemas.warehouse``).
          model_version: The version to read; None: the newest (``describe_embeddings``).
          rows: Expected row count, to size the partitions; None: counted now.

        Raises:
          WarehouseReadError: (when looking up) no rows, or no rows of ``model_version``.
        """
        super().__init__()
        if model_version is None or rows is None:
            summary = describe_embeddings(warehouse_uri, model_version)
            model_version, rows = summary.model_version, summary.rows
        self._warehouse_uri = warehouse_uri
        self._model_version = model_version
        self._partitions = max(1, math.ceil(rows / ROWS_PER_PARTITION))

    @property
    def model_version(self) -> str:
        return self._model_version

    def expand(self, pipeline: beam.pvalue.PBegin) -> beam.PCollection[dict[str, Any]]:
        return (
            pipeline
            | "CreatePartitions" >> beam.Create(list(range(self._partitions)))
            | "SpreadPartitions" >> beam.Reshuffle()
            | "ReadPartitions" >> beam.ParDo(ReadPartitionFn(self._warehouse_uri, self._model_version,
                                                             self._partitions))
        )
