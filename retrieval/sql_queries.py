"""Named SQL queries over an embeddings table, in BigQuery and DuckDB dialects side by side.

Each ``NamedQuery`` holds one BigQuery and one DuckDB text that must give the
same answer (tests run both on the same rows). Values reach the engine only as
bound query parameters (``@name`` in BigQuery, ``$name`` in DuckDB), never
pasted into SQL text; the one exception, the table name, cannot be a
parameter and is validated by ``schemas.warehouse.parse_warehouse_uri``.

``{table}`` in a query is the deduplicated relation (``latest_rows_sql``): an
appended rerun writes rows again, and the newest row per ``(image_id,
model_version)`` is the one every query sees. ``{raw_table}`` is the table as
stored. Users' own SQL (``run_sql``) is read-only by construction: exactly
one SELECT, checked by the engine's parser (and BigQuery's dry run), on a
DuckDB connection that can reach no file, extension or setting.

Every named query except ``versions`` reads one ``model_version`` (the newest,
by latest ``created_at``, unless given), so rows of different models never mix.

Dialect notes, also why the BigQuery texts look the way they do:

- Vectors are compared with ``COSINE_DISTANCE`` (BigQuery) and
  ``list_cosine_similarity`` (DuckDB); similarity = 1 - distance.
- Element-wise work unnests with ``WITH OFFSET`` and selects the offset under
  an alias (``i AS dim``); indexing a second array with ``q[OFFSET(i)]`` inside
  an aggregate is avoided because the local BigQuery emulator evaluates it wrongly.
- DuckDB stores embeddings as FLOAT[]; they are cast to DOUBLE[] so both
  engines compute in double precision.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import math
from typing import Any, Callable, Literal, Mapping, Protocol, Sequence

from schemas.embedding import (
    CREATED_AT,
    EMBEDDING,
    EMBEDDING_RECORD,
    EMBEDDINGS_TABLE,
    IMAGE_ID,
    LABEL,
    MODEL_VERSION,
    SPLIT,
    URI,
)
from schemas.warehouse import WarehouseUri, parse_warehouse_uri

ParamKind = Literal["string", "int64", "float64", "float64_array"]
Dialect = Literal["bigquery", "duckdb"]
MODEL_VERSION_PARAM = "model_version"


@dataclasses.dataclass(frozen=True)
class QueryParam:
    """A named query's parameter.

    Attributes:
      name: Bound as ``@name`` / ``$name``; also the CLI flag ``--name``.
      kind: Value type; ``float64_array`` is a list of floats (a vector).
      help: What it means, for ``--help``.
      default: Value when not given; None means "not given" (see ``absent``).
      absent: The value bound when an optional parameter without default is
        not given (queries test for it, e.g. ``''`` or an empty vector).
    """

    name: str
    kind: ParamKind
    help: str
    default: Any = None
    absent: Any = None


@dataclasses.dataclass(frozen=True)
class NamedQuery:
    """One query in both dialects. ``{table}`` stands for the deduplicated rows (``latest_rows_sql``)."""

    name: str
    description: str
    params: tuple[QueryParam, ...]
    bigquery: str
    duckdb: str
    by_model_version: bool = True
    check: Callable[[Mapping[str, Any]], None] | None = None

    def sql(self, dialect: Dialect) -> str:
        return self.bigquery if dialect == "bigquery" else self.duckdb


@dataclasses.dataclass(frozen=True)
class QueryResult:
    """Rows of a query with their column names; ``model_version`` is the version queried."""

    columns: list[str]
    rows: list[tuple[Any, ...]]
    model_version: str | None = None

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row)) for row in self.rows]


class QueryError(ValueError):
    """A query could not run as asked (bad parameters, no rows for the model version)."""


# --------------------------------------------------------------------------- queries

_NEWEST_MODEL_VERSION = NamedQuery(
    name="newest_model_version",
    description="The model_version whose rows were created last.",
    params=(),
    by_model_version=False,
    bigquery="""
SELECT model_version FROM {table}
GROUP BY model_version
ORDER BY MAX(created_at) DESC, model_version DESC
LIMIT 1""",
    duckdb="""
SELECT model_version FROM {table}
GROUP BY model_version
ORDER BY MAX(created_at) DESC, model_version DESC
LIMIT 1""",
)

_K = QueryParam("k", "int64", "How many neighbors to return.", default=10)
_LIMIT = QueryParam("limit", "int64", "Maximum rows to return.", default=20)

# Upper bounds keep one typo from asking an engine for a result or a
# computation it cannot finish: near_duplicates does bands * band_bits
# multiply-adds per row and dimension, and k / limit size the result.
MAX_K = 10_000
MAX_LIMIT = 1_000_000
MAX_BANDS = 64
MAX_BAND_BITS = 62  # Bucket keys are 64-bit integers: 1 << 62 is the largest safe bit.
MAX_VECTOR_DIM = 65_536


def _check_range(params: Mapping[str, Any], name: str, low: float, high: float, what: str = "") -> None:
    """Refuses a value outside [low, high] (NaN included), quoting it."""
    value = params[name]
    if not low <= value <= high:
        raise QueryError(f"{name} must be >= {low} and <= {high}{what}. Received `{name}={value}`")


def _check_neighbors(params: Mapping[str, Any]) -> None:
    if bool(params.get("image_id")) == bool(params.get("vector")):
        raise QueryError("neighbors needs exactly one of --image_id or --vector")
    _check_range(params, "k", 1, MAX_K)
    vector = params.get("vector") or []
    if len(vector) > MAX_VECTOR_DIM or not all(math.isfinite(v) for v in vector):
        raise QueryError(f"vector must hold at most {MAX_VECTOR_DIM} finite numbers. "
                         f"Received `vector` with {len(vector)} values")


def _check_limit(params: Mapping[str, Any]) -> None:
    _check_range(params, "limit", 0, MAX_LIMIT)


def _check_near_duplicates(params: Mapping[str, Any]) -> None:
    _check_limit(params)
    _check_range(params, "threshold", -1.0, 1.0, " (a cosine similarity)")
    _check_range(params, "bands", 1, MAX_BANDS)
    _check_range(params, "band_bits", 1, MAX_BAND_BITS)


NEIGHBORS = NamedQuery(
    name="neighbors",
    description="Top-k rows by cosine similarity to an image (by image_id, itself excluded) or to a vector.",
    params=(
        QueryParam("image_id", "string", "Find neighbors of this image.", absent=""),
        QueryParam("vector", "float64_array", "Find neighbors of this vector (comma-separated floats).", absent=[]),
        _K,
    ),
    check=_check_neighbors,
    bigquery="""
WITH selected AS (
  SELECT image_id, uri, label, split, embedding FROM {table} WHERE model_version = @model_version
),
probe AS (
  SELECT embedding FROM (SELECT embedding FROM selected WHERE image_id = @image_id LIMIT 1)
  UNION ALL
  SELECT @vector AS embedding FROM UNNEST([1]) WHERE ARRAY_LENGTH(@vector) > 0
)
SELECT s.image_id, s.uri, s.label, s.split, 1 - COSINE_DISTANCE(s.embedding, p.embedding) AS similarity
FROM selected AS s CROSS JOIN probe AS p
WHERE s.image_id != @image_id
ORDER BY similarity DESC, s.image_id
LIMIT @k""",
    duckdb="""
WITH selected AS (
  SELECT image_id, uri, label, split, CAST(embedding AS DOUBLE[]) AS embedding
  FROM {table} WHERE model_version = $model_version
),
probe AS (
  SELECT embedding FROM (SELECT embedding FROM selected WHERE image_id = $image_id LIMIT 1)
  UNION ALL
  SELECT CAST($vector AS DOUBLE[]) AS embedding WHERE len($vector) > 0
)
SELECT s.image_id, s.uri, s.label, s.split, list_cosine_similarity(s.embedding, p.embedding) AS similarity
FROM selected AS s CROSS JOIN probe AS p
WHERE s.image_id != $image_id
ORDER BY similarity DESC, s.image_id
LIMIT $k""",
)

# Shared CTEs: per-label mean vectors. The centroid is not normalized; cosine
# similarity ignores its length.
_BQ_CENTROIDS = """
selected AS (
  SELECT image_id, uri, label, split, embedding FROM {table}
  WHERE model_version = @model_version AND label IS NOT NULL
),
components AS (
  SELECT label, dim, AVG(value) AS value
  FROM (SELECT label, value, i AS dim FROM selected, UNNEST(embedding) AS value WITH OFFSET AS i)
  GROUP BY label, dim
),
centroids AS (
  SELECT label, ARRAY_AGG(value ORDER BY dim) AS centroid FROM components GROUP BY label
)"""
_DUCKDB_CENTROIDS = """
selected AS (
  SELECT image_id, uri, label, split, CAST(embedding AS DOUBLE[]) AS embedding FROM {table}
  WHERE model_version = $model_version AND label IS NOT NULL
),
components AS (
  SELECT label, dim, AVG(value) AS value
  FROM (SELECT label, unnest(embedding) AS value, generate_subscripts(embedding, 1) AS dim FROM selected)
  GROUP BY label, dim
),
centroids AS (
  SELECT label, list(value ORDER BY dim) AS centroid FROM components GROUP BY label
)"""

LABEL_CENTROIDS = NamedQuery(
    name="label_centroids",
    description="Per label: image count, mean cosine similarity of its images to the label's mean vector, "
                "and that mean vector (centroid).",
    params=(),
    bigquery=f"""
WITH {_BQ_CENTROIDS},
cohesion AS (
  SELECT c.label, COUNT(*) AS images, AVG(1 - COSINE_DISTANCE(s.embedding, c.centroid)) AS mean_similarity
  FROM centroids AS c JOIN selected AS s ON s.label = c.label
  GROUP BY c.label
)
SELECT c.label, h.images, h.mean_similarity, c.centroid
FROM centroids AS c JOIN cohesion AS h ON h.label = c.label
ORDER BY c.label""",
    duckdb=f"""
WITH {_DUCKDB_CENTROIDS},
cohesion AS (
  SELECT c.label, COUNT(*) AS images, AVG(list_cosine_similarity(s.embedding, c.centroid)) AS mean_similarity
  FROM centroids AS c JOIN selected AS s ON s.label = c.label
  GROUP BY c.label
)
SELECT c.label, h.images, h.mean_similarity, c.centroid
FROM centroids AS c JOIN cohesion AS h ON h.label = c.label
ORDER BY c.label""",
)

LABEL_OUTLIERS = NamedQuery(
    name="label_outliers",
    description="Images closer to another label's centroid than to their own (likely labeling errors) first: "
                "ordered by margin = own_similarity - nearest_other_similarity, ascending.",
    params=(_LIMIT,),
    check=_check_limit,
    bigquery=f"""
WITH {_BQ_CENTROIDS},
scored AS (
  SELECT s.image_id, s.uri, s.label, s.split, c.label AS centroid_label,
         1 - COSINE_DISTANCE(s.embedding, c.centroid) AS similarity
  FROM selected AS s CROSS JOIN centroids AS c
),
own AS (
  SELECT image_id, uri, label, split, similarity AS own_similarity FROM scored WHERE centroid_label = label
),
other AS (
  SELECT image_id, centroid_label AS nearest_other_label, similarity AS nearest_other_similarity
  FROM (
    SELECT image_id, centroid_label, similarity,
           ROW_NUMBER() OVER (PARTITION BY image_id ORDER BY similarity DESC, centroid_label) AS rank
    FROM scored WHERE centroid_label != label
  )
  WHERE rank = 1
)
SELECT o.image_id, o.uri, o.label, o.split, o.own_similarity, x.nearest_other_label,
       x.nearest_other_similarity, o.own_similarity - x.nearest_other_similarity AS margin
FROM own AS o JOIN other AS x ON x.image_id = o.image_id
ORDER BY margin, o.image_id
LIMIT @limit""",
    duckdb=f"""
WITH {_DUCKDB_CENTROIDS},
scored AS (
  SELECT s.image_id, s.uri, s.label, s.split, c.label AS centroid_label,
         list_cosine_similarity(s.embedding, c.centroid) AS similarity
  FROM selected AS s CROSS JOIN centroids AS c
),
own AS (
  SELECT image_id, uri, label, split, similarity AS own_similarity FROM scored WHERE centroid_label = label
),
other AS (
  SELECT image_id, centroid_label AS nearest_other_label, similarity AS nearest_other_similarity
  FROM (
    SELECT image_id, centroid_label, similarity,
           ROW_NUMBER() OVER (PARTITION BY image_id ORDER BY similarity DESC, centroid_label) AS rank
    FROM scored WHERE centroid_label != label
  )
  WHERE rank = 1
)
SELECT o.image_id, o.uri, o.label, o.split, o.own_similarity, x.nearest_other_label,
       x.nearest_other_similarity, o.own_similarity - x.nearest_other_similarity AS margin
FROM own AS o JOIN other AS x ON x.image_id = o.image_id
ORDER BY margin, o.image_id
LIMIT $limit""",
)

# Blocking by random-hyperplane LSH (SimHash): bit b of a row is the sign of
# its embedding's dot product with hyperplane b, whose weights are +-1 from a
# fixed hash of (b, dim) computed identically in both dialects; bits are cut
# into `bands` integer keys of `band_bits` bits, and only pairs sharing a key
# in some band are scored, instead of all n^2 pairs. A pair at cosine
# similarity s agrees on a bit with probability p = 1 - acos(s)/pi, so it is
# scored with probability 1 - (1 - p^band_bits)^bands: 0.997 at s = 0.95 with
# the defaults, while unrelated pairs (s ~ 0) are scored with ~12% probability.
# The cost is one multiply-add per row, dimension and bit.
_LSH_WEIGHT = "IF({fract} >= 0.5, value, -value)"
_BQ_FRACT = ("(SIN(CAST(bit AS FLOAT64) * 12.9898 + CAST(dim AS FLOAT64) * 78.233) * 43758.5453"
             " - FLOOR(SIN(CAST(bit AS FLOAT64) * 12.9898 + CAST(dim AS FLOAT64) * 78.233) * 43758.5453))")
_DUCKDB_FRACT = ("(sin(CAST(bit AS DOUBLE) * 12.9898 + CAST(dim AS DOUBLE) * 78.233) * 43758.5453"
                 " - floor(sin(CAST(bit AS DOUBLE) * 12.9898 + CAST(dim AS DOUBLE) * 78.233) * 43758.5453))")

NEAR_DUPLICATES = NamedQuery(
    name="near_duplicates",
    description="Pairs of images with cosine similarity >= threshold, scored only within LSH blocks "
                "(random-hyperplane signatures cut into bands).",
    params=(
        QueryParam("threshold", "float64", "Minimum cosine similarity of a pair.", default=0.95),
        QueryParam("bands", "int64", "LSH bands: more = higher recall, more pairs scored.", default=8),
        QueryParam("band_bits", "int64", "Hyperplane bits per band: more = fewer pairs scored, lower recall.",
                   default=6),
        QueryParam("limit", "int64", "Maximum pairs to return.", default=100),
    ),
    check=_check_near_duplicates,
    bigquery=f"""
WITH selected AS (
  SELECT image_id, uri, embedding FROM {{table}} WHERE model_version = @model_version
),
projections AS (
  SELECT image_id, bit, SUM({_LSH_WEIGHT.format(fract=_BQ_FRACT)}) AS projection
  FROM (SELECT image_id, value, i AS dim FROM selected, UNNEST(embedding) AS value WITH OFFSET AS i)
  CROSS JOIN UNNEST(GENERATE_ARRAY(0, @bands * @band_bits - 1)) AS bit
  GROUP BY image_id, bit
),
signatures AS (
  SELECT image_id, DIV(bit, @band_bits) AS band, SUM(IF(projection >= 0, 1 << MOD(bit, @band_bits), 0)) AS bucket
  FROM projections
  GROUP BY image_id, band
),
candidates AS (
  SELECT DISTINCT a.image_id AS image_id_a, b.image_id AS image_id_b
  FROM signatures AS a
  JOIN signatures AS b ON a.band = b.band AND a.bucket = b.bucket AND a.image_id < b.image_id
),
pairs AS (
  SELECT c.image_id_a, a.uri AS uri_a, c.image_id_b, b.uri AS uri_b,
         1 - COSINE_DISTANCE(a.embedding, b.embedding) AS similarity
  FROM candidates AS c
  JOIN selected AS a ON a.image_id = c.image_id_a
  JOIN selected AS b ON b.image_id = c.image_id_b
)
SELECT image_id_a, uri_a, image_id_b, uri_b, similarity FROM pairs
WHERE similarity >= @threshold
ORDER BY similarity DESC, image_id_a, image_id_b
LIMIT @limit""",
    duckdb=f"""
WITH selected AS (
  SELECT image_id, uri, CAST(embedding AS DOUBLE[]) AS embedding FROM {{table}} WHERE model_version = $model_version
),
projections AS (
  SELECT image_id, bit, SUM({_LSH_WEIGHT.format(fract=_DUCKDB_FRACT)}) AS projection
  FROM (SELECT image_id, unnest(embedding) AS value, generate_subscripts(embedding, 1) - 1 AS dim FROM selected)
  CROSS JOIN generate_series(0, $bands * $band_bits - 1) AS bits(bit)
  GROUP BY image_id, bit
),
signatures AS (
  SELECT image_id, bit // $band_bits AS band,
         SUM(IF(projection >= 0, CAST(1 AS BIGINT) << CAST(bit % $band_bits AS INTEGER), 0)) AS bucket
  FROM projections
  GROUP BY image_id, band
),
candidates AS (
  SELECT DISTINCT a.image_id AS image_id_a, b.image_id AS image_id_b
  FROM signatures AS a
  JOIN signatures AS b ON a.band = b.band AND a.bucket = b.bucket AND a.image_id < b.image_id
),
pairs AS (
  SELECT c.image_id_a, a.uri AS uri_a, c.image_id_b, b.uri AS uri_b,
         list_cosine_similarity(a.embedding, b.embedding) AS similarity
  FROM candidates AS c
  JOIN selected AS a ON a.image_id = c.image_id_a
  JOIN selected AS b ON b.image_id = c.image_id_b
)
SELECT image_id_a, uri_a, image_id_b, uri_b, similarity FROM pairs
WHERE similarity >= $threshold
ORDER BY similarity DESC, image_id_a, image_id_b
LIMIT $limit""",
)

STATS = NamedQuery(
    name="stats",
    description="Row and image counts, embedding dimension and time range per label and split.",
    params=(),
    bigquery="""
SELECT model_version, label, split, COUNT(*) AS row_count, COUNT(DISTINCT image_id) AS images,
       MIN(ARRAY_LENGTH(embedding)) AS min_dim, MAX(ARRAY_LENGTH(embedding)) AS max_dim,
       MIN(created_at) AS first_created_at, MAX(created_at) AS last_created_at
FROM {table} WHERE model_version = @model_version
GROUP BY model_version, label, split
ORDER BY label NULLS FIRST, split NULLS FIRST""",
    duckdb="""
SELECT model_version, label, split, COUNT(*) AS row_count, COUNT(DISTINCT image_id) AS images,
       MIN(len(embedding)) AS min_dim, MAX(len(embedding)) AS max_dim,
       MIN(created_at) AS first_created_at, MAX(created_at) AS last_created_at
FROM {table} WHERE model_version = $model_version
GROUP BY model_version, label, split
ORDER BY label NULLS FIRST, split NULLS FIRST""",
)

VERSIONS = NamedQuery(
    name="versions",
    description="Every model_version in the table, newest first: the one query that spans versions.",
    params=(),
    by_model_version=False,
    bigquery="""
SELECT model_version, COUNT(*) AS row_count, COUNT(DISTINCT image_id) AS images,
       MIN(created_at) AS first_created_at, MAX(created_at) AS last_created_at
FROM {table}
GROUP BY model_version
ORDER BY last_created_at DESC, model_version DESC""",
    duckdb="""
SELECT model_version, COUNT(*) AS row_count, COUNT(DISTINCT image_id) AS images,
       MIN(created_at) AS first_created_at, MAX(created_at) AS last_created_at
FROM {table}
GROUP BY model_version
ORDER BY last_created_at DESC, model_version DESC""",
)

NAMED_QUERIES: dict[str, NamedQuery] = {
    q.name: q for q in (NEIGHBORS, LABEL_CENTROIDS, LABEL_OUTLIERS, NEAR_DUPLICATES, STATS, VERSIONS)
}


# --------------------------------------------------------------------------- the table queries read

TABLE_PLACEHOLDER = "{table}"
RAW_TABLE_PLACEHOLDER = "{raw_table}"


def latest_rows_sql(dialect: Dialect, raw_table_sql: str) -> str:
    """The deduplicated embeddings relation, a subquery every named query reads as ``{table}``.

    extract_embeddings appends by default, so a rerun writes each image's row
    again. The rule: per ``(image_id, model_version)`` the row with the latest
    ``created_at`` wins; ties fall to uri, label, split and then the embedding
    as text, all descending, so the answer never depends on storage order.

    Args:
      dialect: ``bigquery`` or ``duckdb``.
      raw_table_sql: The quoted table name.

    Returns:
      A parenthesized SELECT with exactly the embedding record's columns.
    """
    columns = ", ".join(EMBEDDING_RECORD.names)
    embedding_text = f"TO_JSON_STRING({EMBEDDING})" if dialect == "bigquery" else f"CAST({EMBEDDING} AS VARCHAR)"
    order = ", ".join([f"{CREATED_AT} DESC", *(f"{c} DESC NULLS LAST" for c in (URI, LABEL, SPLIT)),
                       f"{embedding_text} DESC"])
    return (
        f"(SELECT {columns} FROM (SELECT {columns}, ROW_NUMBER() OVER "
        f"(PARTITION BY {IMAGE_ID}, {MODEL_VERSION} ORDER BY {order}) AS _newest_first "
        f"FROM {raw_table_sql}) WHERE _newest_first = 1)"
    )


def render_sql(sql: str, engine: SqlEngine) -> str:
    """Replaces ``{raw_table}`` with the table as stored and ``{table}`` with its deduplicated rows."""
    return sql.replace(RAW_TABLE_PLACEHOLDER, engine.raw_table_sql).replace(
        TABLE_PLACEHOLDER, latest_rows_sql(engine.dialect, engine.raw_table_sql)
    )


# --------------------------------------------------------------------------- read-only checks

_READ_ONLY_RULE = "--sql accepts exactly one SELECT (or WITH ... SELECT) statement"


def _statement_preview(text: str) -> str:
    words = " ".join(text.split())
    return words if len(words) <= 60 else f"{words[:57]}..."


def check_duckdb_select(sql: str) -> None:
    """Refuses anything but exactly one SELECT statement, by DuckDB's own parser.

    INSTALL and LOAD parse as LOAD statements, ``COPY``, ``ATTACH``, ``SET``,
    ``PRAGMA``, ``CALL`` and ``EXPLAIN`` as their own types; each is refused by
    name. A SELECT can still call file readers (``read_csv``): the connection's
    configuration, not this check, refuses those (``DuckDBSqlEngine``).

    Raises:
      QueryError: A syntax error, no statement, several, or a non-SELECT one.
    """
    import duckdb

    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as error:
        raise QueryError(f"DuckDB: {error}") from error
    if len(statements) != 1:
        raise QueryError(f"{_READ_ONLY_RULE}; received {len(statements)} statements")
    statement = statements[0]
    if statement.type != duckdb.StatementType.SELECT:
        raise QueryError(f"{_READ_ONLY_RULE}; refused {statement.type.name} statement "
                         f"`{_statement_preview(statement.query)}`")


def check_bigquery_select(sql: str) -> None:
    """Refuses anything but exactly one query (SELECT, WITH, set operation), parsed by sqlglot.

    The BigQuery dry run checks again (``BigQuerySqlEngine.check_read_only``);
    this parse is what refuses where no dry run is available, and it keeps
    scripts (``BEGIN ... END``, ``DECLARE``, ``EXECUTE IMMEDIATE``) away from it.

    Raises:
      QueryError: A syntax error, no statement, several, or a non-query one.
    """
    import sqlglot
    from sqlglot import exp

    try:
        statements = [s for s in sqlglot.parse(sql, read="bigquery") if s is not None]
    except sqlglot.errors.ParseError as error:
        raise QueryError(f"BigQuery SQL: {str(error).splitlines()[0]}") from error
    if len(statements) != 1:
        raise QueryError(f"{_READ_ONLY_RULE}; received {len(statements)} statements")
    statement = statements[0]
    if not isinstance(statement, exp.Query):
        kind = statement.key.upper() if not isinstance(statement, exp.Command) else str(statement.this).upper()
        raise QueryError(f"{_READ_ONLY_RULE}; refused {kind} statement `{_statement_preview(statement.sql())}`")


# --------------------------------------------------------------------------- engines


class SqlEngine(Protocol):
    """Runs SQL with bound parameters against one warehouse table."""

    dialect: Dialect
    raw_table_sql: str  # The table name as stored, quoted for this dialect.

    def check_read_only(self, sql: str) -> None: ...

    def execute(self, sql: str, params: Sequence[tuple[QueryParam, Any]]) -> QueryResult: ...

    def close(self) -> None: ...


def _normalize(value: Any) -> Any:
    """Gives both engines' values one Python form: UTC datetimes, floats, lists."""
    if isinstance(value, datetime.datetime) and value.tzinfo is not None:
        return value.astimezone(datetime.timezone.utc)
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    return value


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# A query may read the table and nothing else: no file, URL or other
# database (enable_external_access covers read_csv, COPY, ATTACH, INSTALL),
# no extension loaded behind its back; lock_configuration (set once the
# table is in place) stops SET from undoing any of it.
_NO_EXTENSIONS = {"autoload_known_extensions": False, "autoinstall_known_extensions": False}


class DuckDBSqlEngine:
    """A DuckDB file (opened read-only) or Parquet files loaded into memory, locked down.

    With external access disabled DuckDB reads no file at all, its own
    Parquet files included, so a ``parquet:`` table is loaded first (local
    files by DuckDB's reader, gs:// ones through Beam's FileSystems), then
    access is cut and the configuration locked.
    """

    dialect: Dialect = "duckdb"

    def __init__(self, warehouse: WarehouseUri):
        import duckdb

        self.raw_table_sql = f'"{warehouse.table}"'
        if warehouse.kind == "duckdb":
            try:
                self._connection = duckdb.connect(warehouse.location, read_only=True,
                                                  config={"enable_external_access": False, **_NO_EXTENSIONS})
            except duckdb.Error as error:
                raise QueryError(f"cannot open DuckDB warehouse {warehouse.location}: {_first_line(error)}") from error
        else:
            self._connection = duckdb.connect(config=dict(_NO_EXTENSIONS))
            self._load_parquet(warehouse)
            self._connection.execute("SET enable_external_access = false")
        self._connection.execute("SET TimeZone = 'UTC'")
        self._connection.execute("SET lock_configuration = true")
        exists = self._connection.execute(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = $table", {"table": warehouse.table}
        ).fetchall()[0][0]
        if not exists:
            self._connection.close()
            raise QueryError(f"warehouse {warehouse} has no table {warehouse.table!r}")

    def _load_parquet(self, warehouse: WarehouseUri) -> None:
        from apache_beam.io.filesystem import BeamIOError
        from apache_beam.io.filesystems import FileSystems

        from transforms.warehouse import parquet_table_glob

        pattern = parquet_table_glob(warehouse)
        try:
            paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
        except (BeamIOError, OSError, ValueError) as error:  # ValueError: a scheme Beam has no filesystem for.
            raise QueryError(f"cannot list Parquet warehouse {pattern}: {_first_line(error)}") from error
        if not paths:
            raise QueryError(f"no Parquet files match {pattern}")
        if "://" not in warehouse.location:
            self._connection.execute(
                f"CREATE TABLE {self.raw_table_sql} AS SELECT * FROM read_parquet($paths)", {"paths": paths}
            )
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        for path in paths:
            with FileSystems.open(path) as handle:
                tables.append(pq.read_table(pa.BufferReader(handle.read())))
        self._connection.register(warehouse.table, pa.concat_tables(tables))

    def check_read_only(self, sql: str) -> None:
        check_duckdb_select(sql)

    def execute(self, sql: str, params: Sequence[tuple[QueryParam, Any]]) -> QueryResult:
        import duckdb

        bound = {param.name: value for param, value in params}
        try:
            cursor = self._connection.execute(sql, bound) if bound else self._connection.execute(sql)
        except duckdb.Error as error:
            raise QueryError(f"DuckDB: {error}") from error
        if cursor.description is None:
            return QueryResult([], [])
        columns = [d[0] for d in cursor.description]
        return QueryResult(columns, [tuple(_normalize(v) for v in row) for row in cursor.fetchall()])

    def close(self) -> None:
        self._connection.close()


_BIGQUERY_TYPES = {"string": "STRING", "int64": "INT64", "float64": "FLOAT64"}
DEFAULT_MAXIMUM_BYTES_BILLED = 10 * 1024**3  # 10 GiB: a large embeddings table, well under a costly mistake.


class BigQuerySqlEngine:
    """A BigQuery table, queried through google-cloud-bigquery with query parameters.

    Every query runs with ``maximum_bytes_billed``, so BigQuery refuses one
    that would scan more instead of billing it.
    """

    dialect: Dialect = "bigquery"

    def __init__(self, warehouse: WarehouseUri, *, maximum_bytes_billed: int = DEFAULT_MAXIMUM_BYTES_BILLED):
        from google.auth import exceptions as auth_exceptions
        from google.cloud import bigquery

        self._bigquery = bigquery
        self._maximum_bytes_billed = maximum_bytes_billed
        try:
            self._client = bigquery.Client(project=warehouse.bigquery_project)
        except auth_exceptions.GoogleAuthError as error:
            raise QueryError(f"BigQuery: no credentials: {_first_line(error)}") from error
        self.raw_table_sql = f"`{warehouse.location}`"

    def _parameter(self, param: QueryParam, value: Any) -> Any:
        if param.kind == "float64_array":
            return self._bigquery.ArrayQueryParameter(param.name, "FLOAT64", [float(v) for v in value])
        return self._bigquery.ScalarQueryParameter(param.name, _BIGQUERY_TYPES[param.kind], value)

    def _query(self, sql: str, config: Any) -> Any:
        """Starts a query job, turning API and auth failures (NotFound, Forbidden, ...) into one-line QueryErrors."""
        from google.api_core import exceptions
        from google.auth import exceptions as auth_exceptions

        try:
            job = self._client.query(sql, job_config=config)
            return job if config.dry_run else job.result()
        except exceptions.GoogleAPICallError as error:
            # errors[0] holds BigQuery's own reason; error.message may lead with the request URL.
            detail = (error.errors[0].get("message") if error.errors else None) or error.message or str(error)
            raise QueryError(f"BigQuery: {type(error).__name__} ({error.code}): {_first_line(detail)}") from error
        except auth_exceptions.GoogleAuthError as error:
            raise QueryError(f"BigQuery: credentials refused: {_first_line(error)}") from error

    def check_read_only(self, sql: str) -> None:
        """Parses (``check_bigquery_select``), then dry-runs (``check_dry_run``)."""
        check_bigquery_select(sql)
        self.check_dry_run(sql)

    def check_dry_run(self, sql: str) -> None:
        """Dry-runs a query: BigQuery's own statement type must be SELECT, its bytes within the limit.

        A dry run plans the query and runs nothing (it is free).

        Raises:
          QueryError: Another statement type, too many bytes, or an API error.
        """
        job = self._query(sql, self._bigquery.QueryJobConfig(dry_run=True, use_query_cache=False))
        if job.statement_type != "SELECT":
            raise QueryError(f"{_READ_ONLY_RULE}; refused {job.statement_type} statement (BigQuery dry run)")
        if job.total_bytes_processed and job.total_bytes_processed > self._maximum_bytes_billed:
            raise QueryError(f"the query would process {job.total_bytes_processed} bytes, more than "
                             f"--maximum_bytes_billed {self._maximum_bytes_billed}")

    def job_config(self, params: Sequence[tuple[QueryParam, Any]]) -> Any:
        """The ``QueryJobConfig`` of a real (not dry) query: bound parameters and the byte limit."""
        return self._bigquery.QueryJobConfig(query_parameters=[self._parameter(p, v) for p, v in params],
                                             maximum_bytes_billed=self._maximum_bytes_billed)

    def execute(self, sql: str, params: Sequence[tuple[QueryParam, Any]]) -> QueryResult:
        result = self._query(sql, self.job_config(params))
        columns = [field.name for field in result.schema]
        return QueryResult(columns, [tuple(_normalize(v) for v in row.values()) for row in result])

    def close(self) -> None:
        self._client.close()


def open_engine(warehouse_uri: str, *, maximum_bytes_billed: int = DEFAULT_MAXIMUM_BYTES_BILLED) -> SqlEngine:
    """Opens the engine that reads a warehouse URI's embeddings table (``schemas.warehouse``).

    Args:
      warehouse_uri: ``bigquery:...``, ``duckdb:...`` or ``parquet:...``.
      maximum_bytes_billed: BigQuery's per-query byte limit (ignored elsewhere).

    Raises:
      QueryError: A malformed URI, or a warehouse that cannot be opened.
    """
    try:
        warehouse = parse_warehouse_uri(warehouse_uri, EMBEDDINGS_TABLE.default_table)
    except ValueError as error:
        raise QueryError(str(error)) from error
    if warehouse.kind == "bigquery":
        return BigQuerySqlEngine(warehouse, maximum_bytes_billed=maximum_bytes_billed)
    return DuckDBSqlEngine(warehouse)


# --------------------------------------------------------------------------- running


def _coerce(param: QueryParam, value: Any) -> Any:
    """Converts a CLI string or Python value to the parameter's type, quoting the bad value."""
    try:
        if param.kind == "string":
            return str(value)
        if param.kind == "int64":
            return int(value)
        if param.kind == "float64":
            return float(value)
        if isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        return [float(v) for v in value]
    except (TypeError, ValueError) as error:
        raise QueryError(f"{param.name} must be {param.kind}. Received `{param.name}={value!r}`") from error


_MODEL_VERSION = QueryParam(MODEL_VERSION_PARAM, "string", "The model_version to read (default: the newest).")


def check_params(query: NamedQuery, given: Mapping[str, Any]) -> dict[str, Any]:
    """Types a named query's parameters, fills defaults and checks their bounds, before any query runs.

    Args:
      query: The query.
      given: Parameter values by name (None = not given); ``model_version``
        may be absent (it then means the newest).

    Returns:
      Typed values by name, None for optional parameters not given.

    Raises:
      QueryError: Unknown parameter, wrong type, or a value out of bounds.
    """
    known = {p.name for p in query.params} | ({MODEL_VERSION_PARAM} if query.by_model_version else set())
    unknown = sorted(name for name, value in given.items() if value is not None and name not in known)
    if unknown:
        raise QueryError(f"{query.name} takes {sorted(known) or 'no parameters'}; received {unknown}")
    values: dict[str, Any] = {}
    for param in _all_params(query):
        value = given.get(param.name)
        if value is None:
            value = param.default
        values[param.name] = None if value is None else _coerce(param, value)
    if query.check is not None:
        query.check(values)
    return values


def _all_params(query: NamedQuery) -> tuple[QueryParam, ...]:
    return query.params + ((_MODEL_VERSION,) if query.by_model_version else ())


def bind_params(query: NamedQuery, given: Mapping[str, Any]) -> list[tuple[QueryParam, Any]]:
    """Checks a named query's parameters (``check_params``) and pairs each with its bound value.

    ``model_version`` must already be resolved for version-scoped queries.
    """
    values = check_params(query, given)
    return [(param, param.absent if values[param.name] is None else values[param.name])
            for param in _all_params(query)]


def newest_model_version(engine: SqlEngine) -> str:
    """The model_version whose rows were created last.

    Raises:
      QueryError: The table has no rows.
    """
    result = engine.execute(render_sql(_NEWEST_MODEL_VERSION.sql(engine.dialect), engine), [])
    if not result.rows:
        raise QueryError("the embeddings table is empty: no model_version to query")
    return str(result.rows[0][0])


def run_named_query(engine: SqlEngine, name: str, params: Mapping[str, Any] | None = None) -> QueryResult:
    """Runs a named query with bound parameters on the deduplicated rows (``latest_rows_sql``).

    Args:
      engine: From ``open_engine``.
      name: A key of ``NAMED_QUERIES``.
      params: Parameter values by name (strings are converted); a missing
        ``model_version`` means the newest.

    Returns:
      The rows, with the model_version that was queried.

    Raises:
      QueryError: Unknown query or bad parameters (checked before any query runs).
    """
    if name not in NAMED_QUERIES:
        raise QueryError(f"unknown query {name!r}; named queries are {sorted(NAMED_QUERIES)}")
    query = NAMED_QUERIES[name]
    given = dict(params or {})
    check_params(query, given)
    model_version = None
    if query.by_model_version:
        model_version = given.get(MODEL_VERSION_PARAM) or newest_model_version(engine)
        given[MODEL_VERSION_PARAM] = model_version
    bound = bind_params(query, given)
    result = engine.execute(render_sql(query.sql(engine.dialect), engine), bound)
    return dataclasses.replace(result, model_version=model_version)


def run_sql(engine: SqlEngine, sql: str) -> QueryResult:
    """Runs the user's own SQL, read-only.

    ``{table}`` stands for the deduplicated rows every named query reads,
    ``{raw_table}`` for the table as stored (every appended row).

    Raises:
      QueryError: Not exactly one SELECT statement, or the engine refused it.
    """
    rendered = render_sql(sql, engine)
    engine.check_read_only(rendered)
    return engine.execute(rendered, [])
