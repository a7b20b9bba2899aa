"""The ``vision-pipelines sql`` command on DuckDB, Parquet and BigQuery-emulator warehouses."""

from __future__ import annotations

import csv
import io
import json

import pytest

from beam_jobs import cli
from beam_jobs import sql as sql_job
from tests.fixtures import warehouses as wh
from transforms import sql_queries as sq


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


def test_missing_duckdb_warehouse_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    code, _, err = _run_cli(capsys, ["--warehouse", f"duckdb:{tmp_path / 'absent.duckdb'}", "--query", "stats"])
    assert code == 2 and "cannot open DuckDB warehouse" in err


def test_run_returns_rows_of_the_newest_version_by_default(embedding_warehouses: wh.EmbeddingWarehouses) -> None:
    result = sql_job.run(["--warehouse", embedding_warehouses.bigquery, "--query", "versions"])
    assert [r["model_version"] for r in result.records()] == [wh.V2, wh.V1]
    result = sql_job.run(["--warehouse", embedding_warehouses.bigquery, "--query", "stats"])
    assert result.model_version == wh.V2
