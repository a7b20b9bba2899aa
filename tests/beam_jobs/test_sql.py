"""The ``vision-pipelines sql`` command on DuckDB, Parquet and BigQuery-emulator warehouses."""

from __future__ import annotations

import csv
import io
import json
import os

import pytest

from beam_jobs import cli
from beam_jobs import sql as sql_job
from retrieval import sql_queries as sq
from tests.fixtures import warehouses as wh


def _run_cli(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = cli.main(["sql", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_output_equals_the_named_query_on_every_warehouse(
    capsys: pytest.CaptureFixture[str], embedding_warehouses: wh.EmbeddingWarehouses
) -> None:
    outputs = {}
    for kind, uri in embedding_warehouses.all().items():
        code, out, _ = _run_cli(capsys, ["--warehouse", uri, "--query", "neighbors", "--image_id", "digit-0003",
                                         "--k", "5", "--model_version", wh.V1, "--format", "json"])
        assert code == 0
        outputs[kind] = json.loads(out)
    engine = sq.open_engine(embedding_warehouses.duckdb)
    try:
        want = sq.run_named_query(engine, "neighbors", {"image_id": "digit-0003", "k": 5, "model_version": wh.V1})
    finally:
        engine.close()
    for kind, records in outputs.items():
        assert [r["image_id"] for r in records] == [r["image_id"] for r in want.records()], kind
        assert records[0]["similarity"] == pytest.approx(want.records()[0]["similarity"], rel=1e-9)


def test_csv_output_has_a_header_and_vectors_as_json(capsys: pytest.CaptureFixture[str],
                                                     embedding_warehouses: wh.EmbeddingWarehouses) -> None:
    code, out, _ = _run_cli(capsys, ["--warehouse", embedding_warehouses.parquet, "--query", "label_centroids",
                                     "--model_version", wh.V1, "--format", "csv"])
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["label"] for r in rows] == [str(d) for d in range(10)]
    assert all(len(json.loads(r["centroid"])) == 16 for r in rows)


def test_table_output_is_aligned_and_names_the_model_version(capsys: pytest.CaptureFixture[str],
                                                             embedding_warehouses: wh.EmbeddingWarehouses) -> None:
    code, out, _ = _run_cli(capsys, ["--warehouse", embedding_warehouses.duckdb, "--query", "label_outliers",
                                     "--limit", "4", "--model_version", wh.V1])
    assert code == 0
    lines = out.splitlines()
    header, rule, body, footer = lines[0], lines[1], lines[2:-1], lines[-1]
    assert header.split() == ["image_id", "uri", "label", "split", "own_similarity", "nearest_other_label",
                              "nearest_other_similarity", "margin"]
    assert len(body) == 4 and footer == f"(4 rows, model_version {wh.V1})"
    # Every column starts at the same offset on every line.
    starts = [i for i, ch in enumerate(rule) if ch == "-" and (i == 0 or rule[i - 1] == " ")]
    for line in body:
        for start in starts[1:]:
            assert line[start - 1] == " "


def test_own_sql_with_the_table_placeholder(capsys: pytest.CaptureFixture[str],
                                            embedding_warehouses: wh.EmbeddingWarehouses) -> None:
    total = sum(len(rows) for rows in embedding_warehouses.rows.values())
    for uri in embedding_warehouses.all().values():
        code, out, _ = _run_cli(capsys, ["--warehouse", uri, "--sql", "SELECT COUNT(*) AS n FROM {table}",
                                         "--format", "json"])
        assert code == 0 and json.loads(out) == [{"n": total}]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--query", "neighbors", "--k", "3"], "exactly one of"),
        (["--query", "stats", "--k", "3"], "stats takes"),
        (["--sql", "SELECT 1", "--k", "3"], "--sql takes no query parameters"),
        (["--sql", "SELEC nonsense FROM {table}"], "DuckDB"),
    ],
)
def test_bad_requests_exit_2_with_a_message(capsys: pytest.CaptureFixture[str],
                                            embedding_warehouses: wh.EmbeddingWarehouses,
                                            argv: list[str], message: str) -> None:
    code, out, err = _run_cli(capsys, ["--warehouse", embedding_warehouses.duckdb, *argv])
    assert code == 2 and out == "" and message in err


def test_run_returns_rows_of_the_newest_version_by_default(embedding_warehouses: wh.EmbeddingWarehouses) -> None:
    result = sql_job.run(["--warehouse", embedding_warehouses.bigquery, "--query", "versions"])
    assert [r["model_version"] for r in result.records()] == [wh.V2, wh.V1]
    result = sql_job.run(["--warehouse", embedding_warehouses.bigquery, "--query", "stats"])
    assert result.model_version == wh.V2


def _assert_one_line_error(code: int, out: str, err: str, message: str, status: int = 2) -> None:
    """One line on stderr, nothing on stdout; status 2 for a bad command line, 3 for nothing to query."""
    assert code == status and out == "", err
    assert message in err and err.startswith("vision-pipelines sql: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize(
    "warehouse,message",
    [
        ("bq:my-project.vision.embeddings", "warehouse URIs look like"),
        ("bigquery:my-project.vision", "expected bigquery:PROJECT.DATASET.TABLE"),
        ("duckdb:", "needs a path"),
        ("parquet:/tmp/x#bad;name", "table names are letters"),
        ("duckdb:{tmp}/not_duckdb.duckdb", "cannot open DuckDB warehouse"),
    ],
)
def test_bad_warehouses_end_with_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], tmp_path,
                                                     warehouse: str, message: str) -> None:
    (tmp_path / "not_duckdb.duckdb").write_text("not a database")
    code, out, err = _run_cli(capsys, ["--warehouse", warehouse.format(tmp=tmp_path), "--query", "versions"])
    _assert_one_line_error(code, out, err, message)


@pytest.mark.parametrize(
    "warehouse,message",
    [
        ("duckdb:{tmp}/absent.duckdb", "cannot open DuckDB warehouse"),
        ("parquet:{tmp}/absent_dir", "no Parquet files match"),
    ],
)
def test_missing_warehouses_end_with_one_line_and_exit_3(capsys: pytest.CaptureFixture[str], tmp_path,
                                                         warehouse: str, message: str) -> None:
    code, out, err = _run_cli(capsys, ["--warehouse", warehouse.format(tmp=tmp_path), "--query", "versions"])
    _assert_one_line_error(code, out, err, message, status=3)


def test_a_duckdb_file_without_the_table_is_a_one_line_error(capsys: pytest.CaptureFixture[str],
                                                             embedding_warehouses: wh.EmbeddingWarehouses) -> None:
    code, out, err = _run_cli(capsys, ["--warehouse", f"{embedding_warehouses.duckdb}#other_table", "--query",
                                       "versions"])
    _assert_one_line_error(code, out, err, "has no table 'other_table'", status=3)


def test_bigquery_not_found_is_a_one_line_error(capsys: pytest.CaptureFixture[str],
                                                embedding_warehouses: wh.EmbeddingWarehouses,
                                                bigquery_emulator) -> None:
    dataset = embedding_warehouses.bigquery.removeprefix("bigquery:").rsplit(".", 1)[0]
    for warehouse in (f"bigquery:{bigquery_emulator.project}.no_such_dataset.embeddings",
                      f"bigquery:{dataset}.no_such_table"):
        for argv in (["--query", "stats"], ["--sql", "SELECT COUNT(*) AS n FROM {table}"]):
            code, out, err = _run_cli(capsys, ["--warehouse", warehouse, *argv])
            _assert_one_line_error(code, out, err, "BigQuery: NotFound (404): Not found", status=3)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--query", "near_duplicates", "--bands", "65"], "bands must be >= 1 and <= 64. Received `bands=65`"),
        (["--query", "near_duplicates", "--bands", "0"], "Received `bands=0`"),
        (["--query", "near_duplicates", "--band_bits", "63"], "Received `band_bits=63`"),
        (["--query", "near_duplicates", "--threshold", "nan"], "Received `threshold=nan`"),
        (["--query", "near_duplicates", "--threshold", "1.5"], "Received `threshold=1.5`"),
        (["--query", "near_duplicates", "--limit", "1000001"], "Received `limit=1000001`"),
        (["--query", "label_outliers", "--limit", "-1"], "Received `limit=-1`"),
        (["--query", "neighbors", "--image_id", "a", "--k", "10001"], "k must be >= 1 and <= 10000"),
        (["--query", "neighbors", "--image_id", "a", "--k", "0"], "Received `k=0`"),
        (["--query", "neighbors", "--vector", "1,nan"], "finite numbers"),
        (["--query", "versions", "--maximum_bytes_billed", "0"], "Received `maximum_bytes_billed=0`"),
        (["--query", "versions", "--duckdb_memory_limit", "lots"], "Received `duckdb_memory_limit=lots`"),
        (["--query", "versions", "--duckdb_max_temp_size", "0"], "Received `duckdb_max_temp_size=0`"),
        (["--query", "near_duplicates", "--bands", "3", "--band_bits", "0"], "it takes bands=1"),
        (["--query", "near_duplicates", "--max_candidate_pairs", "0"], "Received `max_candidate_pairs=0`"),
    ],
)
def test_out_of_bounds_parameters_fail_before_the_warehouse_is_opened(
    capsys: pytest.CaptureFixture[str], tmp_path, argv: list[str], message: str
) -> None:
    # The warehouse does not exist: the parameter is refused first, so no query ever ran.
    code, out, err = _run_cli(capsys, ["--warehouse", f"duckdb:{tmp_path / 'absent.duckdb'}", *argv])
    _assert_one_line_error(code, out, err, message)
    assert not (tmp_path / "absent.duckdb").exists()


@pytest.mark.parametrize(
    "sql,message",
    [
        ("ATTACH '{tmp}/other.duckdb' AS other (READ_WRITE); DROP TABLE embeddings", "received 2 statements"),
        ("ATTACH '{tmp}/other.duckdb' AS other", "refused ATTACH statement"),
        ("COPY (SELECT * FROM {{table}}) TO '{tmp}/out.csv'", "refused COPY statement"),
        ("SELECT * FROM read_csv('{tmp}/secret.csv')", "disabled by configuration"),
        ("INSTALL httpfs", "refused LOAD statement `INSTALL httpfs`"),
        ("LOAD httpfs", "refused LOAD statement `LOAD httpfs`"),
        ("SET threads = 1", "refused SET statement"),
        ("DROP TABLE embeddings", "refused DROP statement"),
    ],
)
def test_sql_escapes_are_refused_on_duckdb(capsys: pytest.CaptureFixture[str], tmp_path,
                                           embedding_warehouses: wh.EmbeddingWarehouses, sql: str,
                                           message: str) -> None:
    (tmp_path / "secret.csv").write_text("password\nhunter2\n")
    code, out, err = _run_cli(capsys, ["--warehouse", embedding_warehouses.duckdb,
                                       "--sql", sql.format(tmp=tmp_path)])
    assert code == 2 and out == "" and message in err and "hunter2" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["secret.csv"]
    code, out, _ = _run_cli(capsys, ["--warehouse", embedding_warehouses.duckdb, "--sql",
                                     "SELECT COUNT(*) AS n FROM {raw_table}", "--format", "json"])
    assert code == 0 and json.loads(out) == [{"n": sum(len(r) for r in embedding_warehouses.rows.values())}]


def test_a_non_select_is_refused_on_bigquery(capsys: pytest.CaptureFixture[str],
                                             embedding_warehouses: wh.EmbeddingWarehouses) -> None:
    total = sum(len(r) for r in embedding_warehouses.rows.values())
    for sql in ("DELETE FROM {raw_table} WHERE TRUE", "DROP TABLE {raw_table}"):
        code, out, err = _run_cli(capsys, ["--warehouse", embedding_warehouses.bigquery, "--sql", sql])
        _assert_one_line_error(code, out, err, "accepts exactly one SELECT")
    code, out, _ = _run_cli(capsys, ["--warehouse", embedding_warehouses.bigquery, "--sql",
                                     "SELECT COUNT(*) AS n FROM {raw_table}", "--format", "json"])
    assert code == 0 and json.loads(out) == [{"n": total}]


def test_near_duplicates_prints_its_chosen_settings_and_refuses_a_run_too_large(
    capsys: pytest.CaptureFixture[str], embedding_warehouses: wh.EmbeddingWarehouses
) -> None:
    code, out, err = _run_cli(capsys, ["--warehouse", embedding_warehouses.duckdb, "--query", "near_duplicates",
                                       "--threshold", "0.999", "--model_version", wh.V1, "--format", "json"])
    assert code == 0, err
    assert {frozenset((r["image_id_a"], r["image_id_b"])) for r in json.loads(out)} == {
        frozenset(pair) for pair in wh.DUPLICATE_OF.items()}
    assert err.startswith("near_duplicates: 303 rows; bands=") and "chosen from the row count" in err
    code, out, err = _run_cli(capsys, ["--warehouse", embedding_warehouses.duckdb, "--query", "near_duplicates",
                                       "--model_version", wh.V1, "--max_candidate_pairs", "10"])
    _assert_one_line_error(code, out, err, "more than max_candidate_pairs=10")
    assert "vision-pipelines near-duplicates --index_dir DIR" in err
    with pytest.raises(SystemExit) as exit_info:  # Set by the plan, not a flag: argparse refuses it.
        _run_cli(capsys, ["--warehouse", embedding_warehouses.duckdb, "--query", "stats", "--max_code_distance", "3"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --max_code_distance" in capsys.readouterr().err
