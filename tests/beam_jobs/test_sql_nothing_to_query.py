"""The sql command on a warehouse with nothing in it: one line and exit 3 ("run extract-embeddings first").

A bad query exits 2 (fix the command line); a missing DuckDB file, a missing
table and an empty one exit 3 (fix the data), so scripts can tell them apart.
"""

from __future__ import annotations

from beam_jobs import sql
from schemas.exit_status import UNUSABLE_INPUT_EXIT, USAGE_ERROR_EXIT
from tests.fixtures.warehouses import write_rows


def test_missing_file_missing_table_and_empty_table_exit_3(tmp_path, capsys):
    missing = f"duckdb:{tmp_path}/none.duckdb"
    assert sql.main(["--warehouse", missing, "--query", "versions"]) == UNUSABLE_INPUT_EXIT
    assert "cannot open DuckDB warehouse" in capsys.readouterr().err

    empty = f"duckdb:{tmp_path}/empty.duckdb"
    write_rows([], empty)  # The real sink creates the table with its schema and no rows.
    assert sql.main(["--warehouse", empty, "--query", "neighbors", "--image_id", "x", "--k", "3"]) == UNUSABLE_INPUT_EXIT
    err = capsys.readouterr().err.strip()
    assert err == "vision-pipelines sql: error: the embeddings table is empty: no model_version to query"

    assert sql.main(["--warehouse", f"{empty}#other", "--query", "versions"]) == UNUSABLE_INPUT_EXIT
    assert "has no table 'other'" in capsys.readouterr().err


def test_a_bad_query_still_exits_2(tmp_path, capsys):
    empty = f"duckdb:{tmp_path}/empty.duckdb"
    write_rows([], empty)
    assert sql.main(["--warehouse", empty, "--sql", "DROP TABLE {table}"]) == USAGE_ERROR_EXIT
    assert capsys.readouterr().err.startswith("vision-pipelines sql: error:")
