"""``--sql`` is read-only by construction: each escape is refused on DuckDB, Parquet and the BigQuery emulator."""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from retrieval import sql_queries as sq
from tests.fixtures import warehouses as wh


@pytest.fixture()
def duckdb_engine(embedding_warehouses: wh.EmbeddingWarehouses) -> Iterator[sq.SqlEngine]:
    engine = sq.open_engine(embedding_warehouses.duckdb)
    yield engine
    engine.close()


@pytest.fixture()
def parquet_engine(embedding_warehouses: wh.EmbeddingWarehouses) -> Iterator[sq.SqlEngine]:
    engine = sq.open_engine(embedding_warehouses.parquet)
    yield engine
    engine.close()


def _row_count(engine: sq.SqlEngine) -> int:
    return int(sq.run_sql(engine, "SELECT COUNT(*) AS n FROM {raw_table}").rows[0][0])


def _escapes(tmp_path) -> list[tuple[str, str]]:
    """(SQL, what the refusal must name): the ways out the issue lists, and a few more."""
    other = tmp_path / "other.duckdb"
    return [
        (f"ATTACH '{other}' AS other (READ_WRITE); DROP TABLE embeddings", "received 2 statements"),
        (f"ATTACH '{other}' AS other (READ_WRITE)", "refused ATTACH statement"),
        ("DROP TABLE embeddings", "refused DROP statement"),
        ("DELETE FROM {raw_table}", "refused DELETE statement"),
        ("CREATE TABLE copied AS SELECT * FROM {table}", "refused CREATE statement"),
        (f"COPY (SELECT * FROM {{table}}) TO '{tmp_path / 'out.csv'}'", "refused COPY statement"),
        ("INSTALL httpfs", "refused LOAD statement `INSTALL httpfs`"),
        ("LOAD httpfs", "refused LOAD statement `LOAD httpfs`"),
        ("SET enable_external_access = true", "refused SET statement"),
        ("PRAGMA enable_profiling", "refused PRAGMA statement"),
        ("SELECT 1; SELECT 2", "received 2 statements"),
        ("", "received 0 statements"),
    ]


def test_every_escape_is_refused_by_name_on_duckdb_and_parquet(
    duckdb_engine: sq.SqlEngine, parquet_engine: sq.SqlEngine, tmp_path
) -> None:
    for engine in (duckdb_engine, parquet_engine):
        before = _row_count(engine)
        for sql, message in _escapes(tmp_path):
            with pytest.raises(sq.QueryError, match="exactly one SELECT") as refused:
                sq.run_sql(engine, sql)
            assert message in str(refused.value), (sql, str(refused.value))
        assert _row_count(engine) == before
    assert os.listdir(tmp_path) == []  # Neither the ATTACHed file nor the COPY target was created.


def test_a_select_cannot_read_files_even_the_warehouse_own(
    duckdb_engine: sq.SqlEngine, parquet_engine: sq.SqlEngine, embedding_warehouses: wh.EmbeddingWarehouses,
    tmp_path
) -> None:
    secret = tmp_path / "secret.csv"
    secret.write_text("password\nhunter2\n")
    database = embedding_warehouses.duckdb.removeprefix("duckdb:")
    readers = [
        f"SELECT * FROM read_csv('{secret}')",
        "SELECT * FROM read_csv('/etc/passwd')",
        f"SELECT * FROM read_text('{secret}')",
        f"SELECT * FROM glob('{tmp_path}/*')",
        f"SELECT COUNT(*) FROM read_parquet('{embedding_warehouses.parquet.removeprefix('parquet:')}/*/*.parquet')",
        f"SELECT * FROM read_parquet('{database}.staging/*/*.parquet')",
    ]
    for engine in (duckdb_engine, parquet_engine):
        for sql in readers:
            with pytest.raises(sq.QueryError, match="disabled by configuration"):
                sq.run_sql(engine, sql)


def test_the_connection_itself_refuses_writes_settings_and_extensions(
    duckdb_engine: sq.SqlEngine, parquet_engine: sq.SqlEngine, tmp_path
) -> None:
    # Past the parser (engine.execute runs anything): the configuration alone must hold.
    refusals = [
        (f"ATTACH '{tmp_path / 'other.duckdb'}' AS other", "disabled by configuration"),
        (f"COPY (SELECT 1 AS x) TO '{tmp_path / 'out.csv'}'", "disabled by configuration"),
        ("INSTALL httpfs", "disabled by configuration"),
        ("LOAD httpfs", "disabled"),
        ("SET enable_external_access = true", "configuration has been locked"),
        ("SET lock_configuration = false", "configuration has been locked"),
        ("SET autoload_known_extensions = true", "configuration has been locked"),
    ]
    for engine in (duckdb_engine, parquet_engine):
        for sql, message in refusals:
            with pytest.raises(sq.QueryError, match=message):
                engine.execute(sql, [])
    with pytest.raises(sq.QueryError, match="read-only"):
        duckdb_engine.execute("DELETE FROM embeddings", [])
    assert os.listdir(tmp_path) == []


def test_reading_queries_still_work(duckdb_engine: sq.SqlEngine, parquet_engine: sq.SqlEngine,
                                    embedding_warehouses: wh.EmbeddingWarehouses) -> None:
    total = sum(len(rows) for rows in embedding_warehouses.rows.values())
    queries = [
        "SELECT COUNT(*) AS n FROM {table}",
        "WITH t AS (SELECT * FROM {table}) SELECT COUNT(*) AS n FROM t",
        "SELECT COUNT(*) AS n FROM (SELECT image_id FROM {table} UNION ALL SELECT image_id FROM {table} LIMIT 0) "
        "UNION ALL SELECT COUNT(*) FROM {raw_table} ORDER BY n DESC LIMIT 1",
        "FROM {raw_table} SELECT COUNT(*) AS n",
    ]
    for engine in (duckdb_engine, parquet_engine):
        for sql in queries:
            assert sq.run_sql(engine, sql).records() == [{"n": total}], sql


@pytest.mark.parametrize(
    "sql,message",
    [
        ("DELETE FROM {raw_table} WHERE TRUE", "refused DELETE statement"),
        ("DROP TABLE {raw_table}", "refused DROP statement"),
        ("INSERT INTO {raw_table} (image_id) VALUES ('x')", "refused INSERT statement"),
        ("CREATE TABLE `test-project.x.y` AS SELECT 1 AS a", "refused CREATE statement"),
        ("EXPORT DATA OPTIONS (uri = 'gs://b/*', format = 'CSV') AS SELECT 1", "refused EXPORT statement"),
        ("EXECUTE IMMEDIATE 'DROP TABLE t'", "refused EXECUTE statement"),
        ("SELECT 1 AS a; DROP TABLE {raw_table}", "received 2 statements"),
    ],
)
def test_non_select_is_refused_on_bigquery(embedding_warehouses: wh.EmbeddingWarehouses, sql: str,
                                           message: str) -> None:
    engine = sq.open_engine(embedding_warehouses.bigquery)
    try:
        before = _row_count(engine)
        with pytest.raises(sq.QueryError, match="exactly one SELECT") as refused:
            sq.run_sql(engine, sql)
        assert message in str(refused.value)
        assert _row_count(engine) == before
    finally:
        engine.close()


def test_bigquery_dry_run_refuses_what_the_parser_would_let_through(
    embedding_warehouses: wh.EmbeddingWarehouses
) -> None:
    engine = sq.open_engine(embedding_warehouses.bigquery)
    assert isinstance(engine, sq.BigQuerySqlEngine)
    try:
        before = _row_count(engine)
        # The dry run on its own (BigQuery's statement type) refuses a DELETE, and runs nothing.
        with pytest.raises(sq.QueryError, match="refused DELETE statement"):
            engine.check_dry_run(sq.render_sql("DELETE FROM {raw_table} WHERE TRUE", engine))
        assert _row_count(engine) == before
        engine.check_dry_run(sq.render_sql("SELECT COUNT(*) AS n FROM {table}", engine))
    finally:
        engine.close()


def test_bigquery_queries_carry_maximum_bytes_billed(embedding_warehouses: wh.EmbeddingWarehouses) -> None:
    # The emulator neither bills nor records the limit, so check what every real query is sent with.
    for limit in (1, 123_456_789):
        engine = sq.open_engine(embedding_warehouses.bigquery, maximum_bytes_billed=limit)
        assert isinstance(engine, sq.BigQuerySqlEngine)
        try:
            params = sq.bind_params(sq.NAMED_QUERIES["stats"], {"model_version": wh.V1})
            config = engine.job_config(params)
            assert config.maximum_bytes_billed == limit and not config.dry_run
            assert [p.name for p in config.query_parameters] == ["model_version"]
        finally:
            engine.close()
    default = sq.open_engine(embedding_warehouses.bigquery)
    try:
        assert default.job_config([]).maximum_bytes_billed == sq.DEFAULT_MAXIMUM_BYTES_BILLED == 10 * 1024**3
    finally:
        default.close()
