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
import os
import shutil
import tempfile
from typing import Any, Callable, Literal, Mapping, Protocol, Sequence

import numpy as np

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
      in_sql: False for a parameter only the query's ``plan`` reads (never bound).
      planned: Set by the query's ``plan`` only; refused when given.
    """

    name: str
    kind: ParamKind
    help: str
    default: Any = None
    absent: Any = None
    in_sql: bool = True
    planned: bool = False


@dataclasses.dataclass(frozen=True)
class NamedQuery:
    """One query in both dialects. ``{table}`` stands for the deduplicated rows (``latest_rows_sql``).

    ``duckdb`` is None for a BigQuery-only query. ``plan``, when set, runs
    on the engine before the query: it may fill parameters from the data or
    refuse the run (``plan_near_duplicates``), and returns a note for the user.
    """

    name: str
    description: str
    params: tuple[QueryParam, ...]
    bigquery: str
    duckdb: str | None
    by_model_version: bool = True
    check: Callable[[Mapping[str, Any]], None] | None = None
    plan: Callable[[SqlEngine, dict[str, Any]], tuple[dict[str, Any], str]] | None = None

    def sql(self, dialect: Dialect) -> str:
        if dialect == "duckdb" and self.duckdb is None:
            raise QueryError(f"{self.name} runs on BigQuery only; on DuckDB and Parquet warehouses use "
                             f"{self.name.split('_vector_search')[0]}")
        return self.bigquery if dialect == "bigquery" else str(self.duckdb)


@dataclasses.dataclass(frozen=True)
class QueryResult:
    """Rows of a query with their column names; ``model_version`` is the version queried."""

    columns: list[str]
    rows: list[tuple[Any, ...]]
    model_version: str | None = None
    note: str | None = None  # What the query's plan chose (e.g. near_duplicates' LSH settings).

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row)) for row in self.rows]


class QueryError(ValueError):
    """A query could not run as asked (bad parameters, no rows for the model version)."""


class NothingToQueryError(QueryError):
    """The warehouse holds nothing to query: no such DuckDB file, no embeddings table, or an empty one.

    Kept apart from other query errors so the ``sql`` command can tell a
    script "run extract-embeddings first" (exit 3) from "fix your query" (exit 2).
    """


# --------------------------------------------------------------------------- queries

# Over the stored table: the newest-row view keeps each (image_id,
# model_version)'s latest row, so a version's latest created_at is the same
# in both, and the stored table answers without sorting every row.
_NEWEST_MODEL_VERSION = NamedQuery(
    name="newest_model_version",
    description="The model_version whose rows were created last.",
    params=(),
    by_model_version=False,
    bigquery="""
SELECT model_version FROM {raw_table}
GROUP BY model_version
ORDER BY MAX(created_at) DESC, model_version DESC
LIMIT 1""",
    duckdb="""
SELECT model_version FROM {raw_table}
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


def _check_vector_search(params: Mapping[str, Any]) -> None:
    _check_limit(params)
    _check_range(params, "threshold", -1.0, 1.0, " (a cosine similarity)")
    _check_range(params, "top_k", 1, MAX_K)


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
# fixed hash of (b, dim) computed identically in both dialects. Each row gets
# a pool of POOL_BITS such bits; band j's key is the row's pool bits at
# band_bits positions drawn for j (a mask), and only pairs sharing a key in
# some band are candidates, instead of all n^2 pairs. Candidates whose whole
# pools differ in more than max_code_distance bits are dropped before the
# exact similarity is computed. A pair at cosine similarity s agrees on a bit
# with probability p = 1 - acos(s)/pi; ``choose_lsh_settings`` turns that
# into the probability of being found and the expected work.
#
# Fixed settings do not scale: on clustered embeddings unrelated pairs of the
# same cluster share buckets far more often than uniform data suggests, and
# the scored pairs grow with n^2 (8 bands x 6 bits ran for more than 8 minutes
# and spilled 42 GB at 100,000 rows). So unless given, bands and band_bits are
# chosen per run (``plan_near_duplicates``) from the row count and the
# similarities of a fixed sample of rows: the settings with the least
# estimated work that still find a pair at the threshold with probability
# ``NEAR_DUPLICATE_RECALL``. band_bits = 0 means one bucket, every pair scored
# (exact). A run whose estimated candidate pairs exceed
# ``max_candidate_pairs`` is refused before it starts, naming the index route.
# The pool caps how selective a key can be at that recall (band_bits 18 here),
# so on clustered data the candidates still grow with n^2 past a few hundred
# thousand rows: that is where the refusal sends users to the index.
#
# The hyperplanes are materialized once (one row per bit) and compared with
# each row by a vector function: per (row, bit) one vectorized call instead of
# one SQL row per (row, bit, dimension), about 10x faster in DuckDB; a shared
# pool makes signing cost POOL_BITS calls per row whatever the bands.
# BigQuery has no dot product function: ``COSINE_DISTANCE <= 1`` is its
# "dot product >= 0" (they differ only where |cosine| < 1e-16). DuckDB keys
# rows by an integer rid for the self-join and materializes the CTEs it reads
# twice; BigQuery keys by image_id, as a global ROW_NUMBER would sort the
# whole table on one worker.
_PLANE_WEIGHT = "IF({fract} >= 0.5, 1.0, -1.0)"


def _hash_fraction(first: str, second: str, dialect: Dialect, multiplier: str) -> str:
    """SQL for a fixed pseudo-random number in [0, 1) from two integer columns, the same in both dialects."""
    cast, sin, floor = ("FLOAT64", "SIN", "FLOOR") if dialect == "bigquery" else ("DOUBLE", "sin", "floor")
    angle = f"{sin}(CAST({first} AS {cast}) * {multiplier} + CAST({second} AS {cast}) * 78.233) * 43758.5453"
    return f"({angle} - {floor}({angle}))"


# Band keys are drawn from one pool of POOL_BITS hyperplane bits per row (two
# 63-bit words; 63 keeps clear of the sign bit in both dialects): band b
# keeps the band_bits pool bits with the smallest hash of (b, bit). Signing
# then costs POOL_BITS distances per row whatever the bands, and a band is
# one AND of the row's words with the band's masks.
POOL_BITS = 126
_BQ_FRACT = _hash_fraction("bit", "dim", "bigquery", "12.9898")
_DUCKDB_FRACT = _hash_fraction("bit", "dim", "duckdb", "12.9898")
_BQ_PICK = _hash_fraction("band", "bit", "bigquery", "39.3468")
_DUCKDB_PICK = _hash_fraction("band", "bit", "duckdb", "39.3468")

NEAR_DUPLICATE_RECALL = 0.99  # Chosen settings find a pair at the threshold with at least this probability.
NEAR_DUPLICATE_SAMPLE_ROWS = 2_000  # Rows whose pairwise similarities drive the estimate (2M pairs).
DEFAULT_MAX_CANDIDATE_PAIRS = 20_000_000  # About a minute of scoring in DuckDB on 2 cores here.
MAX_CANDIDATE_PAIRS = 10**12
# Work model of the chosen settings, in units of one row-vs-plane dot product
# (measured in DuckDB here): a row's band key costs about one, a bucket match
# in the self-join (with its code-distance check) about 3, and scoring a
# pair that passes (DISTINCT, two lookups, one similarity) about 20.
_SIGNATURE_COST = 1.0
_MATCH_COST = 3.0
_PAIR_COST = 20.0
# Candidates whose pool codes differ in more bits than a pair at the threshold
# would with this probability are dropped before scoring.
_CODE_DISTANCE_MISS = 1e-4


def _check_near_duplicates(params: Mapping[str, Any]) -> None:
    _check_limit(params)
    _check_range(params, "threshold", -1.0, 1.0, " (a cosine similarity)")
    _check_range(params, "max_candidate_pairs", 1, MAX_CANDIDATE_PAIRS)
    if params.get("bands") is not None:
        _check_range(params, "bands", 1, MAX_BANDS)
    if params.get("band_bits") is not None:
        _check_range(params, "band_bits", 0, MAX_BAND_BITS, " (0 = score every pair)")
        if params["band_bits"] == 0 and params.get("bands") not in (None, 1):
            raise QueryError(f"band_bits=0 puts every row in one bucket, so it takes bands=1. "
                             f"Received `bands={params['bands']}`")


@dataclasses.dataclass(frozen=True)
class LshPlan:
    """The LSH settings of one near_duplicates run and what they are expected to cost.

    Attributes:
      bands: Number of bands.
      band_bits: Pool bits per band key; 0 = one bucket (every pair scored).
      max_code_distance: Candidates whose pool codes differ in more bits are not scored.
      rows: Rows of the model version.
      sample_rows: Rows whose pairwise similarities the estimate used.
      estimated_matches: Expected bucket matches the self-join enumerates (the engine's work).
      estimated_pairs: Expected distinct pairs scored exactly.
      recall_at_threshold: Probability that a pair exactly at the threshold is found.
      chosen: True when bands and band_bits were chosen here, False when given.
    """

    bands: int
    band_bits: int
    max_code_distance: int
    rows: int
    sample_rows: int
    estimated_matches: float
    estimated_pairs: float
    recall_at_threshold: float
    chosen: bool

    def describe(self) -> str:
        how = "chosen from the row count and a sample" if self.chosen else "as given"
        return (f"near_duplicates: {self.rows:,} rows; bands={self.bands}, band_bits={self.band_bits} ({how}): "
                f"about {self.estimated_matches:,.0f} candidate pairs, {self.estimated_pairs:,.0f} scored; a pair at "
                f"the threshold is found with probability {self.recall_at_threshold:.3f} (estimated from "
                f"{self.sample_rows:,} sampled rows)")


def _agree_probability(similarity: np.ndarray | float) -> np.ndarray:
    """Probability that a random hyperplane puts two vectors at this cosine similarity on the same side."""
    return 1.0 - np.arccos(np.clip(similarity, -1.0, 1.0)) / math.pi


_LOG_FACTORIAL = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, POOL_BITS + 1)))])
_POOL_K = np.arange(POOL_BITS + 1)


def _agreeing_bits_pmf(agree: np.ndarray) -> np.ndarray:
    """P(K = k), k = 0..POOL_BITS, of the pool bits a pair agrees on: Binomial(POOL_BITS, agree), one row per pair."""
    p = np.clip(np.asarray(agree, dtype=np.float64), 1e-12, 1 - 1e-12)[:, None]
    log_choose = _LOG_FACTORIAL[POOL_BITS] - _LOG_FACTORIAL[_POOL_K] - _LOG_FACTORIAL[POOL_BITS - _POOL_K]
    return np.exp(log_choose[None, :] + _POOL_K * np.log(p) + (POOL_BITS - _POOL_K) * np.log1p(-p))


def _band_match(band_bits: int) -> np.ndarray:
    """P(one band's key matches | K agreeing pool bits) = C(K, band_bits) / C(POOL_BITS, band_bits), per K."""
    if band_bits == 0:
        return np.ones(POOL_BITS + 1)
    top = np.where(_POOL_K >= band_bits, _LOG_FACTORIAL[_POOL_K] - _LOG_FACTORIAL[np.maximum(_POOL_K - band_bits, 0)],
                   -np.inf)
    return np.exp(top - (_LOG_FACTORIAL[POOL_BITS] - _LOG_FACTORIAL[POOL_BITS - band_bits]))


def max_code_distance(threshold: float) -> int:
    """Differing pool bits a pair at ``threshold`` stays within with probability 1 - ``_CODE_DISTANCE_MISS``."""
    pmf = _agreeing_bits_pmf(_agree_probability(np.asarray([threshold])))[0]
    below = np.cumsum(pmf)  # P(K <= k)
    return int(POOL_BITS - np.argmax(below > _CODE_DISTANCE_MISS))


def choose_lsh_settings(rows: int, sample_similarities: np.ndarray, threshold: float, *,
                        bands: int | None = None, band_bits: int | None = None,
                        recall: float = NEAR_DUPLICATE_RECALL) -> LshPlan:
    """The bands and band_bits with the least estimated work that find a pair at ``threshold`` w.p. ``recall``.

    Of the pool's bits a pair agrees on K ~ Binomial(POOL_BITS, p); given K a
    band matches with probability C(K, band_bits) / C(POOL_BITS, band_bits)
    (bands taken as independent), and a match is scored when K >=
    POOL_BITS - max_code_distance. Expected matches and scored pairs are
    C(rows, 2) x their mean over the sampled pairs; work = rows x POOL_BITS
    (signing) + rows x bands (keys) + matches and scored pairs at their
    costs. Small tables come out as band_bits = 0 (every pair scored, exact).

    Args:
      rows: Rows to search.
      sample_similarities: Cosine similarities of sampled pairs of rows.
      threshold: The query's similarity threshold.
      bands: Given by the user (then only band_bits is chosen), or None.
      band_bits: Given by the user (then only bands is chosen), or None.
      recall: Probability required at the threshold, for chosen settings.

    Raises:
      QueryError: One setting was given and no value of the other reaches ``recall``.
    """
    total = rows * (rows - 1) / 2
    # A histogram keeps the sweep cheap; 2,000 bins resolve 0.001 in similarity.
    counts, edges = np.histogram(np.clip(sample_similarities, -1.0, 1.0), bins=2000, range=(-1.0, 1.0))
    keep = counts > 0
    centres = (edges[:-1] + edges[1:])[keep] / 2
    weights = counts[keep].astype(np.float64)
    if not weights.size:  # Fewer than two sampled rows: nothing to learn from, assume the worst.
        centres, weights = np.asarray([1.0]), np.asarray([1.0])
    weights /= weights.sum()
    sample_pmf = weights @ _agreeing_bits_pmf(_agree_probability(centres))  # P(K = k) of a random pair.
    threshold_pmf = _agreeing_bits_pmf(_agree_probability(np.asarray([threshold])))[0]
    distance = max_code_distance(threshold)
    scored = _POOL_K >= POOL_BITS - distance
    pairs_sampled = float(np.sum(counts))
    sample_rows = int(round((1 + math.sqrt(1 + 8 * pairs_sampled)) / 2)) if pairs_sampled else min(rows, 1)

    def found(b: int, r: int) -> float:
        if r == 0:
            return 1.0
        return float(threshold_pmf @ (-np.expm1(b * np.log1p(-np.minimum(_band_match(r), 1 - 1e-16))) * scored))

    def plan(b: int, r: int, chosen: bool) -> LshPlan:
        if r == 0:
            return LshPlan(b, 0, POOL_BITS, rows, sample_rows, total, total, 1.0, chosen)
        match = _band_match(r)
        any_band = -np.expm1(b * np.log1p(-np.minimum(match, 1 - 1e-16)))
        return LshPlan(b, r, distance, rows, sample_rows, total * float(sample_pmf @ (b * match)),
                       total * float(sample_pmf @ (any_band * scored)), found(b, r), chosen)

    if bands is not None and band_bits is not None:
        return plan(bands, band_bits, False)
    options = []
    for r in ([band_bits] if band_bits is not None else range(0, MAX_BAND_BITS + 1)):
        for b in ([bands] if bands is not None else range(1, (1 if r == 0 else MAX_BANDS) + 1)):
            if found(b, r) >= recall:
                options.append(plan(b, r, True))
                break  # More bands only add work for the same bits.
    if not options:
        given = f"bands={bands}" if bands is not None else f"band_bits={band_bits}"
        raise QueryError(f"with {given} no {'band_bits' if bands is not None else 'bands'} value finds a pair at "
                         f"similarity {threshold} with probability {recall}; leave both unset to let the query choose")

    def work(p: LshPlan) -> float:
        signing = rows * POOL_BITS if p.band_bits else 0
        return (signing + rows * p.bands * _SIGNATURE_COST + _MATCH_COST * p.estimated_matches
                + _PAIR_COST * p.estimated_pairs)

    return min(options, key=lambda p: (work(p), p.band_bits, p.bands))


# The plan's two reads go to the stored table, not the newest-row view: that
# view sorts every row (its tie-break casts each embedding to text), which at
# a million rows cost more than a minute before a refusal could be given.
# Rows are counted per image_id, as the view would count them; a reran
# image's rows carry the same embedding, so which one the sample takes does
# not matter to an estimate.
_ROW_COUNT = NamedQuery(
    name="row_count",
    description="Images of one model version.",
    params=(),
    bigquery="SELECT COUNT(DISTINCT image_id) AS row_count FROM {raw_table} WHERE model_version = @model_version",
    duckdb="SELECT COUNT(DISTINCT image_id) AS row_count FROM {raw_table} WHERE model_version = $model_version",
)
# A fixed sample: the images whose image_id has the smallest MD5, the same images in both dialects.
_SAMPLE_ROWS = QueryParam("sample_rows", "int64", "Rows to sample.")
_EMBEDDING_SAMPLE = NamedQuery(
    name="embedding_sample",
    description="A fixed sample of one model version's embeddings.",
    params=(_SAMPLE_ROWS,),
    bigquery="""
WITH sampled AS (
  SELECT image_id FROM {raw_table} WHERE model_version = @model_version
  GROUP BY image_id ORDER BY TO_HEX(MD5(image_id)), image_id LIMIT @sample_rows
)
SELECT ANY_VALUE(t.embedding) AS embedding
FROM {raw_table} AS t JOIN sampled AS s ON s.image_id = t.image_id
WHERE t.model_version = @model_version
GROUP BY t.image_id
ORDER BY t.image_id""",
    duckdb="""
WITH sampled AS (
  SELECT image_id FROM {raw_table} WHERE model_version = $model_version
  GROUP BY image_id ORDER BY md5(image_id), image_id LIMIT $sample_rows
)
SELECT any_value(CAST(t.embedding AS DOUBLE[])) AS embedding
FROM {raw_table} AS t JOIN sampled AS s ON s.image_id = t.image_id
WHERE t.model_version = $model_version
GROUP BY t.image_id
ORDER BY t.image_id""",
)


def sample_similarities(vectors: Sequence[Sequence[float]]) -> np.ndarray:
    """Cosine similarities of every pair of the given vectors (zero vectors left out)."""
    matrix = np.asarray([v for v in vectors if v is not None and len(v)], dtype=np.float64)
    if matrix.ndim != 2 or len(matrix) < 2:
        return np.zeros(0)
    norms = np.linalg.norm(matrix, axis=1)
    matrix = matrix[norms > 0] / norms[norms > 0, None]
    upper = np.triu_indices(len(matrix), k=1)
    return (matrix @ matrix.T)[upper]


def plan_near_duplicates(engine: SqlEngine, values: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Fills in bands / band_bits (``choose_lsh_settings``) and refuses a run estimated to score too many pairs.

    Args:
      engine: The engine the query will run on.
      values: near_duplicates' typed parameters, model_version resolved.

    Returns:
      The parameters with bands and band_bits set, and a one-line note
      saying which settings run and what they are expected to cost.

    Raises:
      QueryError: The estimate exceeds ``max_candidate_pairs``.
    """
    version = [(_MODEL_VERSION, values[MODEL_VERSION_PARAM])]
    rows = int(engine.execute(render_sql(_ROW_COUNT.sql(engine.dialect), engine), version).rows[0][0])
    sample = engine.execute(render_sql(_EMBEDDING_SAMPLE.sql(engine.dialect), engine),
                            [(_SAMPLE_ROWS, NEAR_DUPLICATE_SAMPLE_ROWS), *version])
    lsh = choose_lsh_settings(rows, sample_similarities([row[0] for row in sample.rows]), values["threshold"],
                              bands=values.get("bands"), band_bits=values.get("band_bits"))
    limit = values["max_candidate_pairs"]
    if lsh.estimated_matches > limit:
        fix = ("raise --band_bits or leave --bands/--band_bits unset to let the query choose" if not lsh.chosen
               else "raise --threshold")
        how = "the cheapest settings that find" if lsh.chosen else "given; they find"
        raise QueryError(
            f"near_duplicates would enumerate about {lsh.estimated_matches:,.0f} candidate pairs among {rows:,} rows "
            f"with bands={lsh.bands}, band_bits={lsh.band_bits} ({how} a pair at similarity {values['threshold']} "
            f"with probability {lsh.recall_at_threshold:.3f}), more than max_candidate_pairs={limit:,}. To go on: "
            f"{fix}, raise --max_candidate_pairs if the engine can take it, or use the ScaNN index: "
            f"`vision-pipelines build-index --warehouse W --output_dir DIR` then "
            f"`vision-pipelines near-duplicates --index_dir DIR --threshold {values['threshold']}`"
        )
    planned = {"bands": lsh.bands, "band_bits": lsh.band_bits, "max_code_distance": lsh.max_code_distance}
    return {**values, **planned}, lsh.describe()


NEAR_DUPLICATES = NamedQuery(
    name="near_duplicates",
    description="Pairs of images with cosine similarity >= threshold, scored only within LSH blocks "
                "(random-hyperplane signatures cut into bands, settings chosen from the table unless given).",
    params=(
        QueryParam("threshold", "float64", "Minimum cosine similarity of a pair.", default=0.95),
        QueryParam("bands", "int64", "LSH bands: more = higher recall, more pairs scored. "
                                     "Default: chosen from the table size."),
        QueryParam("band_bits", "int64", "Hyperplane bits per band: more = fewer pairs scored, lower recall; "
                                         "0 = score every pair. Default: chosen from the table size."),
        QueryParam("limit", "int64", "Maximum pairs to return.", default=100),
        QueryParam("max_candidate_pairs", "int64", "Refuse to run when the estimated candidate pairs exceed this.",
                   default=DEFAULT_MAX_CANDIDATE_PAIRS, in_sql=False),
        QueryParam("max_code_distance", "int64", "Set by the plan: differing pool bits a scored pair may have.",
                   planned=True),
    ),
    check=_check_near_duplicates,
    plan=plan_near_duplicates,
    bigquery=f"""
WITH selected AS (
  SELECT image_id, uri, embedding FROM {{table}} WHERE model_version = @model_version
),
dims AS (
  SELECT i AS dim
  FROM (SELECT embedding FROM selected ORDER BY ARRAY_LENGTH(embedding) DESC, image_id LIMIT 1) AS longest,
       UNNEST(longest.embedding) AS value WITH OFFSET AS i
),
planes AS (
  SELECT bit, ARRAY_AGG({_PLANE_WEIGHT.format(fract=_BQ_FRACT)} ORDER BY dim) AS plane
  FROM UNNEST(GENERATE_ARRAY(0, IF(@band_bits = 0, 0, {POOL_BITS}) - 1)) AS bit CROSS JOIN dims
  GROUP BY bit
),
codes AS (
  SELECT s.image_id,
         SUM(IF(COSINE_DISTANCE(s.embedding, p.plane) <= 1 AND p.bit < 63, 1 << p.bit, 0)) AS low,
         SUM(IF(COSINE_DISTANCE(s.embedding, p.plane) <= 1 AND p.bit >= 63, 1 << (p.bit - 63), 0)) AS high
  FROM selected AS s CROSS JOIN planes AS p
  GROUP BY s.image_id
  UNION ALL
  SELECT image_id, 0 AS low, 0 AS high FROM selected WHERE @band_bits = 0
),
picks AS (
  SELECT band, bit FROM (
    SELECT band, bit, ROW_NUMBER() OVER (PARTITION BY band ORDER BY {_BQ_PICK}, bit) AS pick
    FROM UNNEST(GENERATE_ARRAY(0, @bands - 1)) AS band
    CROSS JOIN UNNEST(GENERATE_ARRAY(0, IF(@band_bits = 0, 0, {POOL_BITS}) - 1)) AS bit
  ) WHERE pick <= @band_bits
),
masks AS (
  SELECT band, SUM(IF(bit < 63, 1 << bit, 0)) AS mask_low, SUM(IF(bit >= 63, 1 << (bit - 63), 0)) AS mask_high
  FROM picks GROUP BY band
  UNION ALL
  SELECT 0 AS band, 0 AS mask_low, 0 AS mask_high FROM UNNEST([1]) WHERE @band_bits = 0
),
signatures AS (
  SELECT c.image_id, m.band, c.low & m.mask_low AS key_low, c.high & m.mask_high AS key_high, c.low, c.high
  FROM codes AS c CROSS JOIN masks AS m
),
candidates AS (
  SELECT DISTINCT a.image_id AS image_id_a, b.image_id AS image_id_b
  FROM signatures AS a
  JOIN signatures AS b
    ON a.band = b.band AND a.key_low = b.key_low AND a.key_high = b.key_high AND a.image_id < b.image_id
  WHERE BIT_COUNT(a.low ^ b.low) + BIT_COUNT(a.high ^ b.high) <= @max_code_distance
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
WITH selected AS MATERIALIZED (
  SELECT row_number() OVER (ORDER BY image_id) AS rid, image_id, uri, CAST(embedding AS DOUBLE[]) AS embedding
  FROM {{table}} WHERE model_version = $model_version
),
dims AS (
  SELECT dim FROM range(COALESCE((SELECT MAX(len(embedding)) FROM selected), 0)) AS d(dim)
),
planes AS (
  SELECT bit, list(CAST({_PLANE_WEIGHT.format(fract=_DUCKDB_FRACT)} AS DOUBLE) ORDER BY dim) AS plane
  FROM range(IF($band_bits = 0, 0, {POOL_BITS})) AS b(bit) CROSS JOIN dims
  GROUP BY bit
),
projections AS (
  SELECT s.rid, p.bit, list_dot_product(s.embedding, p.plane) >= 0 AS positive
  FROM selected AS s CROSS JOIN planes AS p
),
codes AS MATERIALIZED (
  SELECT rid,
         SUM(IF(positive AND bit < 63, CAST(1 AS BIGINT) << CAST(bit AS INTEGER), 0)) AS low,
         SUM(IF(positive AND bit >= 63, CAST(1 AS BIGINT) << CAST(bit - 63 AS INTEGER), 0)) AS high
  FROM projections
  GROUP BY rid
  UNION ALL
  SELECT rid, 0 AS low, 0 AS high FROM selected WHERE $band_bits = 0
),
picks AS (
  SELECT band, bit FROM (
    SELECT band, bit, row_number() OVER (PARTITION BY band ORDER BY {_DUCKDB_PICK}, bit) AS pick
    FROM range($bands) AS x(band) CROSS JOIN range(IF($band_bits = 0, 0, {POOL_BITS})) AS y(bit)
  ) WHERE pick <= $band_bits
),
masks AS (
  SELECT band, SUM(IF(bit < 63, CAST(1 AS BIGINT) << CAST(bit AS INTEGER), 0)) AS mask_low,
         SUM(IF(bit >= 63, CAST(1 AS BIGINT) << CAST(bit - 63 AS INTEGER), 0)) AS mask_high
  FROM picks GROUP BY band
  UNION ALL
  SELECT 0 AS band, 0 AS mask_low, 0 AS mask_high WHERE $band_bits = 0
),
signatures AS MATERIALIZED (
  SELECT c.rid, m.band, c.low & m.mask_low AS key_low, c.high & m.mask_high AS key_high, c.low, c.high
  FROM codes AS c CROSS JOIN masks AS m
),
candidates AS (
  SELECT DISTINCT a.rid AS rid_a, b.rid AS rid_b
  FROM signatures AS a
  JOIN signatures AS b ON a.band = b.band AND a.key_low = b.key_low AND a.key_high = b.key_high AND a.rid < b.rid
  WHERE bit_count(xor(a.low, b.low)) + bit_count(xor(a.high, b.high)) <= $max_code_distance
),
pairs AS (
  SELECT a.image_id AS image_id_a, a.uri AS uri_a, b.image_id AS image_id_b, b.uri AS uri_b,
         list_cosine_similarity(a.embedding, b.embedding) AS similarity
  FROM candidates AS c
  JOIN selected AS a ON a.rid = c.rid_a
  JOIN selected AS b ON b.rid = c.rid_b
)
SELECT image_id_a, uri_a, image_id_b, uri_b, similarity FROM pairs
WHERE similarity >= $threshold
ORDER BY similarity DESC, image_id_a, image_id_b
LIMIT $limit""",
)

# BigQuery's own route for large tables: VECTOR_SEARCH of the table against
# itself, which uses the column's vector index (IVF or TREE_AH, see the
# README) when there is one. The base is the stored table filtered on
# model_version, not the deduplicated {table}: a window over the table would
# keep BigQuery from using the index. Rows a rerun appended again collapse
# in the GROUP BY, and each pair is reported once, whichever side found it.
NEAR_DUPLICATES_VECTOR_SEARCH = NamedQuery(
    name="near_duplicates_vector_search",
    description="BigQuery only: near_duplicates through VECTOR_SEARCH of the table against itself "
                "(uses the embedding column's vector index); top k neighbors per image, filtered by threshold.",
    params=(
        QueryParam("threshold", "float64", "Minimum cosine similarity of a pair.", default=0.95),
        QueryParam("top_k", "int64", "Neighbors VECTOR_SEARCH returns per image (the image itself is one).",
                   default=10),
        QueryParam("limit", "int64", "Maximum pairs to return.", default=100),
    ),
    check=_check_vector_search,
    bigquery="""
WITH vectors AS (
  SELECT image_id, uri, embedding FROM {raw_table} WHERE model_version = @model_version
),
matches AS (
  SELECT IF(query.image_id < base.image_id, query.image_id, base.image_id) AS image_id_a,
         IF(query.image_id < base.image_id, query.uri, base.uri) AS uri_a,
         IF(query.image_id < base.image_id, base.image_id, query.image_id) AS image_id_b,
         IF(query.image_id < base.image_id, base.uri, query.uri) AS uri_b,
         1 - distance AS similarity
  FROM VECTOR_SEARCH(
    (SELECT image_id, uri, embedding FROM vectors), 'embedding',
    (SELECT image_id, uri, embedding FROM vectors), 'embedding',
    top_k => @top_k, distance_type => 'COSINE')
  WHERE query.image_id != base.image_id AND distance <= 1 - @threshold
)
SELECT image_id_a, ANY_VALUE(uri_a) AS uri_a, image_id_b, ANY_VALUE(uri_b) AS uri_b, MAX(similarity) AS similarity
FROM matches
GROUP BY image_id_a, image_id_b
ORDER BY similarity DESC, image_id_a, image_id_b
LIMIT @limit""",
    duckdb=None,
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
    q.name: q for q in (NEIGHBORS, LABEL_CENTROIDS, LABEL_OUTLIERS, NEAR_DUPLICATES, NEAR_DUPLICATES_VECTOR_SEARCH,
                        STATS, VERSIONS)
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


DEFAULT_DUCKDB_MEMORY_LIMIT = 4 * 1024**3  # Bytes; DuckDB's own default is 80% of the machine.
DEFAULT_DUCKDB_MAX_TEMP_SIZE = 16 * 1024**3  # Bytes of spill files; never more than half the free disk.
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_byte_size(text: str | int, name: str) -> int:
    """Bytes from ``4GiB``, ``500MB``, ``1024`` (plain bytes); refuses anything else, quoting it."""
    value = str(text).strip().lower().replace(" ", "")
    number = value.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = value[len(number):]
    try:
        size = int(float(number) * _SIZE_UNITS[unit])
    except (KeyError, ValueError):
        size = 0
    if size < 1:
        raise QueryError(f"{name} must be a positive size such as 4GiB or 500MB. Received `{name}={text}`")
    return size


class DuckDBSqlEngine:
    """A DuckDB file (opened read-only) or Parquet files loaded into memory, locked down.

    With external access disabled DuckDB reads no file at all, its own
    Parquet files included, so a ``parquet:`` table is loaded first (local
    files by DuckDB's reader, gs:// ones through Beam's FileSystems), then
    access is cut and the configuration locked.

    Every connection runs within a memory limit and spills to a private
    temporary directory of bounded size (removed on close), so no query can
    take the machine's memory or fill its disk: one that needs more fails
    with a QueryError naming the limit. The spill limit is also capped at
    half the free space where the directory lives.
    """

    dialect: Dialect = "duckdb"

    def __init__(self, warehouse: WarehouseUri, *, memory_limit: int = DEFAULT_DUCKDB_MEMORY_LIMIT,
                 max_temp_size: int = DEFAULT_DUCKDB_MAX_TEMP_SIZE):
        import duckdb

        self.raw_table_sql = f'"{warehouse.table}"'
        self._temp_dir = tempfile.mkdtemp(prefix="vision-pipelines-sql-")
        self.memory_limit = memory_limit
        self.max_temp_size = min(max_temp_size, shutil.disk_usage(self._temp_dir).free // 2)
        # temp_directory cannot be set once external access is off, so access is cut after connecting.
        limits = {"memory_limit": f"{memory_limit}B", "temp_directory": self._temp_dir,
                  "max_temp_directory_size": f"{self.max_temp_size}B", **_NO_EXTENSIONS}
        try:
            if warehouse.kind == "duckdb":
                try:
                    self._connection = duckdb.connect(warehouse.location, read_only=True, config=limits)
                except duckdb.Error as error:
                    missing = not os.path.exists(warehouse.location)
                    raise (NothingToQueryError if missing else QueryError)(
                        f"cannot open DuckDB warehouse {warehouse.location}: {_first_line(error)}") from error
            else:
                self._connection = duckdb.connect(config=limits)
                self._load_parquet(warehouse)
            self._connection.execute("SET enable_external_access = false")
            self._connection.execute("SET TimeZone = 'UTC'")
            self._connection.execute("SET lock_configuration = true")
            exists = self._connection.execute(
                "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = $table", {"table": warehouse.table}
            ).fetchall()[0][0]
            if not exists:
                self._connection.close()
                raise NothingToQueryError(f"warehouse {warehouse} has no table {warehouse.table!r}")
        except BaseException:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            raise

    def _load_parquet(self, warehouse: WarehouseUri) -> None:
        from apache_beam.io.filesystem import BeamIOError
        from apache_beam.io.filesystems import FileSystems

        from schemas.warehouse import parquet_table_glob

        pattern = parquet_table_glob(warehouse)
        try:
            paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
        except (BeamIOError, OSError, ValueError) as error:  # ValueError: a scheme Beam has no filesystem for.
            raise QueryError(f"cannot list Parquet warehouse {pattern}: {_first_line(error)}") from error
        if not paths:
            raise NothingToQueryError(f"no Parquet files match {pattern}")
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
        except duckdb.OutOfMemoryException as error:
            raise QueryError(
                f"DuckDB: the query needs more than its limits (memory_limit {self.memory_limit:,} bytes, temporary "
                f"files max {self.max_temp_size:,} bytes): {_first_line(error)} Raise --duckdb_memory_limit or "
                f"--duckdb_max_temp_size, or narrow the query") from error
        except duckdb.Error as error:
            raise QueryError(f"DuckDB: {error}") from error
        if cursor.description is None:
            return QueryResult([], [])
        columns = [d[0] for d in cursor.description]
        return QueryResult(columns, [tuple(_normalize(v) for v in row) for row in cursor.fetchall()])

    def close(self) -> None:
        self._connection.close()
        shutil.rmtree(self._temp_dir, ignore_errors=True)


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
            kind = NothingToQueryError if isinstance(error, exceptions.NotFound) else QueryError
            raise kind(f"BigQuery: {type(error).__name__} ({error.code}): {_first_line(detail)}") from error
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


def open_engine(warehouse_uri: str, *, maximum_bytes_billed: int = DEFAULT_MAXIMUM_BYTES_BILLED,
                duckdb_memory_limit: int = DEFAULT_DUCKDB_MEMORY_LIMIT,
                duckdb_max_temp_size: int = DEFAULT_DUCKDB_MAX_TEMP_SIZE) -> SqlEngine:
    """Opens the engine that reads a warehouse URI's embeddings table (``schemas.warehouse``).

    Args:
      warehouse_uri: ``bigquery:...``, ``duckdb:...`` or ``parquet:...``.
      maximum_bytes_billed: BigQuery's per-query byte limit (ignored elsewhere).
      duckdb_memory_limit: DuckDB's memory limit in bytes (DuckDB and Parquet warehouses).
      duckdb_max_temp_size: DuckDB's spill-file limit in bytes (capped at half the free disk).

    Raises:
      QueryError: A malformed URI, or a warehouse that cannot be opened.
    """
    try:
        warehouse = parse_warehouse_uri(warehouse_uri, EMBEDDINGS_TABLE.default_table)
    except ValueError as error:
        raise QueryError(str(error)) from error
    if warehouse.kind == "bigquery":
        return BigQuerySqlEngine(warehouse, maximum_bytes_billed=maximum_bytes_billed)
    return DuckDBSqlEngine(warehouse, memory_limit=duckdb_memory_limit, max_temp_size=duckdb_max_temp_size)


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


def check_params(query: NamedQuery, given: Mapping[str, Any], *, planned: bool = False) -> dict[str, Any]:
    """Types a named query's parameters, fills defaults and checks their bounds, before any query runs.

    Args:
      query: The query.
      given: Parameter values by name (None = not given); ``model_version``
        may be absent (it then means the newest).
      planned: Also accept the parameters the query's plan sets.

    Returns:
      Typed values by name, None for optional parameters not given.

    Raises:
      QueryError: Unknown parameter, wrong type, or a value out of bounds.
    """
    known = {p.name for p in query.params if planned or not p.planned} | (
        {MODEL_VERSION_PARAM} if query.by_model_version else set())
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
    values = check_params(query, given, planned=True)
    return [(param, param.absent if values[param.name] is None else values[param.name])
            for param in _all_params(query) if param.in_sql]


def newest_model_version(engine: SqlEngine) -> str:
    """The model_version whose rows were created last.

    Raises:
      QueryError: The table has no rows.
    """
    result = engine.execute(render_sql(_NEWEST_MODEL_VERSION.sql(engine.dialect), engine), [])
    if not result.rows:
        raise NothingToQueryError("the embeddings table is empty: no model_version to query")
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
    sql = render_sql(query.sql(engine.dialect), engine)
    model_version = None
    if query.by_model_version:
        model_version = given.get(MODEL_VERSION_PARAM) or newest_model_version(engine)
        given[MODEL_VERSION_PARAM] = model_version
    note = None
    if query.plan is not None:
        given, note = query.plan(engine, check_params(query, given))
    bound = bind_params(query, given)
    result = engine.execute(sql, bound)
    return dataclasses.replace(result, model_version=model_version, note=note)


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
