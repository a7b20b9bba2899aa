"""Warehouse addresses (``--warehouse`` / ``--output`` URIs) and table layouts.

A warehouse URI names where rows go and which engine reads them back:

- ``bigquery:PROJECT.DATASET.TABLE``: a BigQuery table;
- ``duckdb:PATH`` or ``duckdb:PATH#TABLE``: a table in a local DuckDB file;
- ``parquet:DIR`` or ``parquet:DIR#TABLE``: Parquet files ``DIR/TABLE/*.parquet``
  (local or gs://), readable by DuckDB, pandas, Spark or BigQuery external tables.

Without ``#TABLE`` the record's default table name is used (``embeddings``
for embedding rows). Identifiers are validated here, once, because table
names are the one part of a query that cannot be a bound parameter.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

from schemas.fields import RecordSchema

WarehouseKind = Literal["bigquery", "duckdb", "parquet"]
WAREHOUSE_KINDS: tuple[WarehouseKind, ...] = ("bigquery", "duckdb", "parquet")
WriteDisposition = Literal["append", "truncate"]
WRITE_DISPOSITIONS: tuple[WriteDisposition, ...] = ("append", "truncate")
PARQUET_SUFFIX = ".parquet"
STAGING_SUFFIX = ".staging"  # DuckDB file PATH -> Parquet shards waiting to be loaded under PATH.staging/
RUNS_SUFFIX = ".runs"  # DuckDB file PATH -> per-run artifacts under PATH.runs/
PARQUET_RUNS_DIR = "_runs"  # Parquet root DIR -> per-run artifacts under DIR/_runs/ (no table reads it)

# BigQuery project ids may contain '-' (and a domain prefix 'example.com:');
# dataset and table names are letters, digits and underscores.
_PROJECT_RE = re.compile(r"^(?:[a-z][a-z0-9.\-]*:)?[a-z][a-z0-9\-]{4,28}[a-z0-9]$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,1023}$")


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """How one record type is stored as a warehouse table.

    Attributes:
      record: The row schema.
      default_table: Table name when the URI names none (DuckDB, Parquet).
      partition_field: A timestamp column BigQuery partitions by day, or None.
      clustering_fields: Up to four columns BigQuery clusters by.
    """

    record: RecordSchema
    default_table: str
    partition_field: str | None = None
    clustering_fields: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.default_table):
            raise ValueError(f"table names are letters, digits and '_'. Received `default_table={self.default_table}`")
        if self.partition_field is not None and self.record.field(self.partition_field).kind != "timestamp":
            raise ValueError(f"partition_field must be a timestamp column. Received `partition_field={self.partition_field}`")
        if len(self.clustering_fields) > 4:
            raise ValueError(f"BigQuery clusters by at most 4 columns. Received `clustering_fields={self.clustering_fields}`")
        for name in self.clustering_fields:
            self.record.field(name)

    def bigquery_table_parameters(self) -> dict[str, Any]:
        """Partitioning and clustering in the form of BigQuery's table / load-job resource."""
        parameters: dict[str, Any] = {}
        if self.partition_field:
            parameters["timePartitioning"] = {"type": "DAY", "field": self.partition_field}
        if self.clustering_fields:
            parameters["clustering"] = {"fields": list(self.clustering_fields)}
        return parameters


@dataclasses.dataclass(frozen=True)
class WarehouseUri:
    """A parsed warehouse URI.

    Attributes:
      kind: ``bigquery``, ``duckdb`` or ``parquet``.
      location: ``PROJECT.DATASET.TABLE`` for BigQuery, the DuckDB file path,
        or the Parquet root directory.
      table: Table name (the last part of the BigQuery name; the ``#TABLE``
        suffix or the spec's default elsewhere).
    """

    kind: WarehouseKind
    location: str
    table: str

    @property
    def bigquery_project(self) -> str:
        return self._bigquery_parts()[0]

    @property
    def bigquery_dataset(self) -> str:
        return self._bigquery_parts()[1]

    def _bigquery_parts(self) -> tuple[str, str, str]:
        if self.kind != "bigquery":
            raise ValueError(f"not a BigQuery warehouse: {self}")
        project, dataset, table = self.location.rsplit(".", 2)
        return project, dataset, table

    def __str__(self) -> str:
        if self.kind == "bigquery":
            return f"bigquery:{self.location}"
        return f"{self.kind}:{self.location}#{self.table}"


def parse_warehouse_uri(uri: str, default_table: str) -> WarehouseUri:
    """Parses ``bigquery:P.D.T``, ``duckdb:PATH[#TABLE]`` or ``parquet:DIR[#TABLE]``.

    Args:
      uri: The user's ``--warehouse`` value.
      default_table: Table name for DuckDB/Parquet URIs without ``#TABLE``.

    Returns:
      The validated address.

    Raises:
      ValueError: Unknown scheme, empty location or an invalid identifier;
        the message quotes the received URI.
    """
    kind, sep, rest = uri.partition(":")
    if not sep or kind not in WAREHOUSE_KINDS:
        raise ValueError(
            f"warehouse URIs look like bigquery:PROJECT.DATASET.TABLE, duckdb:PATH or parquet:DIR. Received `{uri}`"
        )
    if kind == "bigquery":
        parts = rest.rsplit(".", 2)
        if len(parts) != 3 or not _PROJECT_RE.match(parts[0]) or not all(_NAME_RE.match(p) for p in parts[1:]):
            raise ValueError(f"expected bigquery:PROJECT.DATASET.TABLE. Received `{uri}`")
        return WarehouseUri("bigquery", rest, parts[2])
    location, _, table = rest.partition("#")
    table = table or default_table
    if not location:
        raise ValueError(f"{kind} warehouse needs a path. Received `{uri}`")
    if not _NAME_RE.match(table):
        raise ValueError(f"table names are letters, digits and '_'. Received `{uri}`")
    return WarehouseUri(kind, location, table)  # type: ignore[arg-type]


def run_artifacts_root(warehouse: WarehouseUri) -> str | None:
    """Where a job writing to a local warehouse keeps its per-run artifacts when the user names none.

    Each run gets its own ``run-*`` directory under this root
    (``schemas.publication``), so concurrent jobs writing to one warehouse never
    overwrite each other's dead letters. BigQuery has no local place: the user
    names one with ``--artifacts_dir``.
    """
    if warehouse.kind == "duckdb":
        return f"{warehouse.location}{RUNS_SUFFIX}"
    if warehouse.kind == "parquet":
        return f"{warehouse.location.rstrip('/')}/{PARQUET_RUNS_DIR}"
    return None


# Paths shared by the warehouse writer (transforms.warehouse) and the readers
# (transforms.warehouse_read, retrieval.sql_queries), so both always mean the same files.


def parquet_table_dir(warehouse: WarehouseUri) -> str:
    """Directory holding a Parquet warehouse table's files."""
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.join(warehouse.location, warehouse.table)


def parquet_table_glob(warehouse: WarehouseUri) -> str:
    """Glob matching every file of a Parquet warehouse table."""
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.join(parquet_table_dir(warehouse), f"*{PARQUET_SUFFIX}")


def duckdb_staging_dir(warehouse: WarehouseUri) -> str:
    """Where a DuckDB warehouse's Parquet shards wait to be loaded."""
    return f"{warehouse.location}{STAGING_SUFFIX}"


def list_table_files(table_glob: str) -> list[str]:
    """The files a table glob matches now (none when its directory does not exist yet)."""
    from apache_beam.io.filesystems import FileSystems

    return sorted(m.path for m in FileSystems.match([table_glob])[0].metadata_list)
