"""near_duplicates at scale: LSH settings chosen from the table, planted pairs found, clear refusals, bounded DuckDB.

The large table here is synthetic clustered 128-d unit vectors (``benchmarks.vectors``), the kind of data on
which fixed LSH settings went quadratic, with duplicates planted at known similarities; it is loaded into
DuckDB directly in the warehouse schema (the Beam writer has its own tests). The 100,000-row measurement is
in docs/benchmarks.md.
"""

from __future__ import annotations

import os
from typing import Iterator

import duckdb
import numpy as np
import pytest
import sqlglot

from benchmarks.vectors import clustered_unit_vectors, embedding_table, plant_duplicates
from retrieval import sql_queries as sq
from tests.fixtures import warehouses as wh

ROWS = 20_000
VERSION = "synthetic-v1"
THRESHOLD = 0.95
# Planted pairs: 40 spread over [0.951, 0.999] must all be found; 200 right at the threshold measure recall.
SPREAD = np.linspace(0.951, 0.999, 40)
AT_THRESHOLD = np.full(200, 0.9505)


@pytest.fixture(scope="module")
def clustered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[frozenset[str], float]]]:
    """A DuckDB warehouse of ROWS clustered vectors plus planted copies; yields its URI and the planted pairs."""
    vectors = clustered_unit_vectors(ROWS, seed=3)
    similarities = np.concatenate([SPREAD, AT_THRESHOLD])
    originals = np.random.default_rng(4).choice(ROWS, size=len(similarities), replace=False)
    copies = plant_duplicates(vectors, originals, similarities)
    ids = [f"img-{i:05d}" for i in range(ROWS)] + [f"dup-{i:05d}" for i in originals]
    synthetic = embedding_table(np.vstack([vectors, copies]), ids, VERSION)  # noqa: F841 (DuckDB reads it by name)
    path = os.path.join(tmp_path_factory.mktemp("clustered"), "warehouse.duckdb")
    connection = duckdb.connect(path)
    connection.execute("CREATE TABLE embeddings AS SELECT * FROM synthetic")
    connection.close()
    planted = {frozenset((f"img-{o:05d}", f"dup-{o:05d}")): float(s) for o, s in zip(originals, similarities)}
    yield f"duckdb:{path}", planted


def _pairs(result: sq.QueryResult) -> dict[frozenset[str], float]:
    return {frozenset((r["image_id_a"], r["image_id_b"])): r["similarity"] for r in result.records()}


def test_chosen_settings_find_every_planted_pair_in_a_clustered_table(
        clustered: tuple[str, dict[frozenset[str], float]]) -> None:
    uri, planted = clustered
    engine = sq.open_engine(uri)
    try:
        result = sq.run_named_query(engine, "near_duplicates", {"threshold": THRESHOLD, "limit": 10_000})
    finally:
        engine.close()
    assert result.note and "chosen from the row count" in result.note
    assert "band_bits=0" not in result.note  # Blocking, not every pair: 2e8 pairs would be scored.
    found = _pairs(result)
    spread = {pair for pair, s in planted.items() if s > 0.951}
    assert spread <= set(found)
    at_threshold = [pair for pair, s in planted.items() if s < 0.951]
    assert sum(pair in found for pair in at_threshold) >= 0.97 * len(at_threshold)  # Chosen for 0.99.
    assert all(s >= THRESHOLD for s in found.values())
    # Nothing else in the table is that close (clusters sit near cosine 0.5), so every pair found was planted.
    assert set(found) <= set(planted)
    for pair, similarity in found.items():
        assert similarity == pytest.approx(planted[pair], abs=1e-6)


def test_settings_follow_the_table_size_and_the_sampled_similarities() -> None:
    vectors = clustered_unit_vectors(100_000, seed=3)
    sample = sq.sample_similarities(vectors[np.random.default_rng(0).permutation(len(vectors))[:2_000]])
    plans = {rows: sq.choose_lsh_settings(rows, sample, THRESHOLD) for rows in (1_000, 100_000)}
    for plan in plans.values():
        assert plan.chosen and plan.recall_at_threshold >= sq.NEAR_DUPLICATE_RECALL
    # The pairs scored stay a small multiple of the rows, far from the 5e9 pairs of 100,000 rows.
    assert plans[100_000].estimated_pairs < 5 * 100_000
    assert plans[100_000].estimated_matches < 100 * 100_000
    # Every pair is needed at threshold -1: one bucket, exact.
    assert sq.choose_lsh_settings(300, sample, -1.0).band_bits == 0
    given = sq.choose_lsh_settings(100_000, sample, THRESHOLD, bands=8, band_bits=6)
    assert not given.chosen and (given.bands, given.band_bits) == (8, 6)
    assert given.estimated_matches > 100 * plans[100_000].estimated_matches  # The old defaults: quadratic.


def test_a_run_estimated_too_large_is_refused_naming_its_settings_and_the_index_route(
        clustered: tuple[str, dict[frozenset[str], float]]) -> None:
    uri, _ = clustered
    engine = sq.open_engine(uri)
    try:
        with pytest.raises(sq.QueryError) as chosen:
            sq.run_named_query(engine, "near_duplicates", {"threshold": THRESHOLD, "max_candidate_pairs": 1000})
        with pytest.raises(sq.QueryError) as given:
            sq.run_named_query(engine, "near_duplicates", {"threshold": THRESHOLD, "bands": 8, "band_bits": 6})
        with pytest.raises(sq.QueryError, match="takes"):
            sq.run_named_query(engine, "near_duplicates", {"max_code_distance": 3})
        with pytest.raises(sq.QueryError, match="band_bits=0 puts every row in one bucket"):
            sq.run_named_query(engine, "near_duplicates", {"bands": 4, "band_bits": 0})
    finally:
        engine.close()
    for error in (chosen.value, given.value):
        message = str(error)
        assert "bands=" in message and "band_bits=" in message and "candidate pairs among 20,240 rows" in message
        assert "vision-pipelines near-duplicates --index_dir DIR --threshold 0.95" in message
    assert "max_candidate_pairs=1,000" in str(chosen.value) and "raise --threshold" in str(chosen.value)
    assert "bands=8, band_bits=6 (given" in str(given.value) and "raise --band_bits" in str(given.value)


def test_duckdb_runs_within_its_memory_and_temporary_space_limits(
        embedding_warehouses: wh.EmbeddingWarehouses) -> None:
    engine = sq.open_engine(embedding_warehouses.duckdb, duckdb_memory_limit=32 * 1024**2,
                            duckdb_max_temp_size=1024**2)
    assert isinstance(engine, sq.DuckDBSqlEngine)
    temp_dir = engine._temp_dir
    try:
        # A sort of ~600 MB of strings: more than the memory limit, and more than the spill limit.
        with pytest.raises(sq.QueryError,
                           match=r"needs more than its limits .*temporary files max 1,048,576 bytes.*--duckdb_max_temp_size"):
            sq.run_sql(engine, "SELECT i, repeat(md5(CAST(i AS VARCHAR)), 4) AS s FROM range(4000000) AS t(i) "
                               "ORDER BY s")
        limits = sq.run_sql(engine, "SELECT current_setting('memory_limit') AS m, "
                                    "current_setting('max_temp_directory_size') AS t").rows[0]
        assert limits == ("32.0 MiB", "1.0 MiB")  # Locked: a SET is refused (tests/retrieval/test_sql_read_only.py).
        assert sq.run_sql(engine, "SELECT COUNT(*) AS n FROM {raw_table}").rows[0][0] > 0  # Still usable.
    finally:
        engine.close()
    assert not os.path.exists(temp_dir)


def test_byte_sizes_are_parsed_or_refused() -> None:
    assert sq.parse_byte_size("4GiB", "x") == 4 * 1024**3
    assert sq.parse_byte_size("500MB", "x") == 500 * 10**6
    assert sq.parse_byte_size(2048, "x") == 2048
    for bad in ("", "lots", "-1GB", "4XB", "0"):
        with pytest.raises(sq.QueryError, match=r"x must be a positive size .* Received `x="):
            sq.parse_byte_size(bad, "x")


def test_vector_search_form_is_a_read_only_bigquery_query_and_refused_on_duckdb(
        embedding_warehouses: wh.EmbeddingWarehouses) -> None:
    query = sq.NAMED_QUERIES["near_duplicates_vector_search"]
    text = query.bigquery
    sq.check_bigquery_select(text.replace("{raw_table}", "`p.d.embeddings`"))
    parsed = sqlglot.parse_one(text.replace("{raw_table}", "`p.d.embeddings`"), read="bigquery")
    assert "VECTOR_SEARCH" in parsed.sql(dialect="bigquery").upper()
    for part in ("top_k => @top_k", "distance_type => 'COSINE'", "distance <= 1 - @threshold",
                 "WHERE model_version = @model_version", "query.image_id != base.image_id"):
        assert part in text
    engine = sq.open_engine(embedding_warehouses.duckdb)
    try:
        with pytest.raises(sq.QueryError, match="runs on BigQuery only; on DuckDB and Parquet warehouses use "
                                                "near_duplicates"):
            sq.run_named_query(engine, "near_duplicates_vector_search", {"model_version": wh.V1})
    finally:
        engine.close()


def test_vector_search_on_the_bigquery_emulator_fails_in_one_clear_line(
        embedding_warehouses: wh.EmbeddingWarehouses) -> None:
    # bqemulator 1.4.0 has no VECTOR_SEARCH (real BigQuery does); the query must still end in a QueryError.
    engine = sq.open_engine(embedding_warehouses.bigquery)
    try:
        with pytest.raises(sq.QueryError, match="^BigQuery: ") as error:
            sq.run_named_query(engine, "near_duplicates_vector_search", {"model_version": wh.V1, "threshold": 0.99})
    finally:
        engine.close()
    assert "\n" not in str(error.value)
