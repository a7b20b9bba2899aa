"""SQL over an embeddings warehouse: named queries with bound parameters, or your own SQL.

Not a Beam pipeline: it runs one query on the engine that holds the table
(BigQuery, or DuckDB for ``duckdb:`` and ``parquet:`` warehouses) and prints
the rows.

Inputs: ``--warehouse`` (``bigquery:PROJECT.DATASET.TABLE``, ``duckdb:PATH``
or ``parquet:DIR``, as written by extract_embeddings) and either
``--query NAME`` with that query's parameters or ``--sql "..."`` where
``{table}`` stands for the embeddings table, deduplicated (the newest row per
``(image_id, model_version)``, as every named query reads it) and
``{raw_table}`` for the table as stored.
Output: the rows on stdout as an aligned table, CSV or a JSON array.

Read-only by construction: ``--sql`` takes exactly one SELECT (or WITH ...
SELECT) statement; DuckDB runs it on a connection with external access and
extension loading disabled and its configuration locked, BigQuery only after
a dry run reports a SELECT, and every BigQuery query is capped by
``--maximum_bytes_billed``; DuckDB runs within ``--duckdb_memory_limit`` and
spills at most ``--duckdb_max_temp_size`` of temporary files (never more than
half the free disk). ``--query near_duplicates`` chooses its LSH settings
from the table and prints them on stderr, and refuses a run it estimates too
large. Errors (bad URI, missing warehouse, refused SQL,
out-of-bounds parameter, BigQuery NotFound/Forbidden) print one line on
stderr and exit with status 2.

Example::

    vision-pipelines sql --warehouse duckdb:out/warehouse.duckdb \
        --query neighbors --image_id 3f1c... --k 5
    vision-pipelines sql --warehouse bigquery:my-proj.vision.embeddings \
        --query label_outliers --limit 20 --format csv
    vision-pipelines sql --warehouse duckdb:out/warehouse.duckdb \
        --sql "SELECT label, COUNT(*) AS n FROM {table} GROUP BY label"
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import io
import json
import logging
import sys
from typing import Any, Literal

from retrieval.sql_queries import (
    DEFAULT_DUCKDB_MAX_TEMP_SIZE,
    DEFAULT_DUCKDB_MEMORY_LIMIT,
    DEFAULT_MAXIMUM_BYTES_BILLED,
    MODEL_VERSION_PARAM,
    NAMED_QUERIES,
    NothingToQueryError,
    QueryError,
    QueryResult,
    check_params,
    open_engine,
    parse_byte_size,
    run_named_query,
    run_sql,
)
from schemas.exit_status import UNUSABLE_INPUT_EXIT, USAGE_ERROR_EXIT
from schemas.redaction import redacted_console

OutputFormat = Literal["table", "csv", "json"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = ("table", "csv", "json")
_TABLE_VECTOR_VALUES = 4  # Vector cells show this many values in the terminal table.
_MAX_BYTES_BILLED_LIMIT = 10**15  # 1 PB: anything above is a typo, not a budget.


@dataclasses.dataclass(frozen=True)
class SqlConfig:
    """Validated command line of the sql command."""

    warehouse: str
    query: str | None
    sql: str | None
    params: dict[str, Any]
    output_format: OutputFormat
    maximum_bytes_billed: int = DEFAULT_MAXIMUM_BYTES_BILLED
    duckdb_memory_limit: int = DEFAULT_DUCKDB_MEMORY_LIMIT
    duckdb_max_temp_size: int = DEFAULT_DUCKDB_MAX_TEMP_SIZE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vision-pipelines sql",
        description="Run a named query or your own SQL on an embeddings warehouse.",
        epilog="named queries:\n" + "\n".join(
            f"  {q.name}: {q.description}" for q in NAMED_QUERIES.values()
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--warehouse", required=True,
                        help="bigquery:PROJECT.DATASET.TABLE, duckdb:PATH[#TABLE] or parquet:DIR[#TABLE].")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--query", choices=sorted(NAMED_QUERIES), help="A named query.")
    what.add_argument("--sql", help="Your own SQL: exactly one SELECT (or WITH ... SELECT) statement. {table} "
                                    "stands for the embeddings table with the newest row per (image_id, "
                                    "model_version), {raw_table} for the table as stored.")
    parser.add_argument("--format", dest="output_format", choices=OUTPUT_FORMATS, default="table",
                        help="Output: aligned table (default), csv or json.")
    parser.add_argument("--maximum_bytes_billed", type=int, default=DEFAULT_MAXIMUM_BYTES_BILLED,
                        help="BigQuery only: refuse a query that would bill more bytes than this. "
                             f"Default: {DEFAULT_MAXIMUM_BYTES_BILLED} (10 GiB).")
    parser.add_argument("--duckdb_memory_limit", default=f"{DEFAULT_DUCKDB_MEMORY_LIMIT // 1024**3}GiB",
                        help="DuckDB and Parquet warehouses: the engine's memory limit (e.g. 4GiB, 500MB); a query "
                             "needing more spills to temporary files. Default: %(default)s.")
    parser.add_argument("--duckdb_max_temp_size", default=f"{DEFAULT_DUCKDB_MAX_TEMP_SIZE // 1024**3}GiB",
                        help="DuckDB and Parquet warehouses: most bytes of temporary (spill) files, never more than "
                             "half the free disk; a query needing more fails. Default: %(default)s.")
    parameters = parser.add_argument_group("query parameters (each query takes those it lists)")
    parameters.add_argument(f"--{MODEL_VERSION_PARAM}", help="The model_version to read (default: the newest).")
    by_name: dict[str, list[tuple[str, Any, str]]] = {}
    for query in NAMED_QUERIES.values():
        for param in (p for p in query.params if not p.planned):
            by_name.setdefault(param.name, []).append((query.name, param.default, param.help))
    for name, uses in by_name.items():
        defaults = ", ".join(f"{q} {d}" for q, d, _ in uses if d is not None)
        note = f" Default: {defaults}." if defaults else ""
        parameters.add_argument(f"--{name}", help=f"{uses[0][2]} Used by {', '.join(q for q, _, _ in uses)}.{note}")
    seen = {MODEL_VERSION_PARAM, *by_name}
    parser.set_defaults(param_names=sorted(seen))
    return parser


def parse_config(argv: list[str]) -> SqlConfig:
    """Parses and checks the command line, query parameters' types and bounds included.

    argparse exits with status 2 on unknown flags; everything else raises.

    Raises:
      QueryError: Parameters given with ``--sql``, or a parameter the named
        query does not take, of the wrong type or out of bounds.
    """
    args = _parser().parse_args(argv)
    params = {name: getattr(args, name) for name in args.param_names if getattr(args, name) is not None}
    if args.sql is not None and params:
        raise QueryError(f"--sql takes no query parameters; received {sorted(params)}")
    if args.query is not None:
        check_params(NAMED_QUERIES[args.query], params)
    if not 1 <= args.maximum_bytes_billed <= _MAX_BYTES_BILLED_LIMIT:
        raise QueryError(f"maximum_bytes_billed must be >= 1 and <= {_MAX_BYTES_BILLED_LIMIT}. "
                         f"Received `maximum_bytes_billed={args.maximum_bytes_billed}`")
    return SqlConfig(args.warehouse, args.query, args.sql, params, args.output_format, args.maximum_bytes_billed,
                     parse_byte_size(args.duckdb_memory_limit, "duckdb_memory_limit"),
                     parse_byte_size(args.duckdb_max_temp_size, "duckdb_max_temp_size"))


def _cell_text(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6f}"
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, list):
        shown = ", ".join(_cell_text(v) for v in value[:_TABLE_VECTOR_VALUES])
        more = f", ... ({len(value)} values)" if len(value) > _TABLE_VECTOR_VALUES else ""
        return f"[{shown}{more}]"
    return str(value)


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value


def format_table(result: QueryResult) -> str:
    """Aligned columns for the terminal, vectors abbreviated, with a row count."""
    cells = [[_cell_text(v) for v in row] for row in result.rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(result.columns)]
    numeric = [all(isinstance(row[i], (int, float)) for row in result.rows if row[i] is not None)
               for i in range(len(result.columns))]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    lines = [line(list(result.columns)), line(["-" * w for w in widths])]
    lines += [line(row) for row in cells]
    footer = f"({len(result.rows)} row{'s' if len(result.rows) != 1 else ''}"
    footer += f", model_version {result.model_version})" if result.model_version else ")"
    return "\n".join(lines + [footer]) + "\n"


def format_csv(result: QueryResult) -> str:
    """CSV with a header; vectors as JSON arrays, NULL as an empty field."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(result.columns)
    for row in result.rows:
        writer.writerow(["" if v is None else json.dumps(v) if isinstance(v, list) else _json_value(v) for v in row])
    return buffer.getvalue()


def format_json(result: QueryResult) -> str:
    """A JSON array of objects, one per row."""
    return json.dumps([{c: _json_value(v) for c, v in zip(result.columns, row)} for row in result.rows],
                      indent=1) + "\n"


_FORMATTERS = {"table": format_table, "csv": format_csv, "json": format_json}


def _execute(config: SqlConfig) -> QueryResult:
    engine = open_engine(config.warehouse, maximum_bytes_billed=config.maximum_bytes_billed,
                         duckdb_memory_limit=config.duckdb_memory_limit, duckdb_max_temp_size=config.duckdb_max_temp_size)
    try:
        if config.sql is not None:
            return run_sql(engine, config.sql)
        return run_named_query(engine, str(config.query), config.params)
    finally:
        engine.close()


def run(argv: list[str] | None = None) -> QueryResult:
    """Parses the command line, runs the query and returns its rows."""
    return _execute(parse_config(list(sys.argv[1:] if argv is None else argv)))


def main(argv: list[str] | None = None) -> int:
    """Runs the command and prints the rows.

    Exit status 2 for a bad query or parameter, 3 when the warehouse holds
    nothing to query (no DuckDB file, no table, an empty table).
    """
    # sqlglot warns on stderr when it falls back to an opaque statement; the refusal says it in one line.
    logging.getLogger("sqlglot").setLevel(logging.ERROR)
    try:
        config = parse_config(list(sys.argv[1:] if argv is None else argv))
        result = _execute(config)
    except QueryError as error:
        sys.stderr.write(f"vision-pipelines sql: error: {error}\n")
        return UNUSABLE_INPUT_EXIT if isinstance(error, NothingToQueryError) else USAGE_ERROR_EXIT
    if result.note:
        sys.stderr.write(f"{result.note}\n")
    sys.stdout.write(_FORMATTERS[config.output_format](result))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    with redacted_console():
        sys.exit(main())
